"""The ``cpu`` backend: fused C kernels (``na_cpu.c``), their build (:mod:`.build`), window tables
(:mod:`.geometry`) and the backend (:mod:`.backend`)."""
