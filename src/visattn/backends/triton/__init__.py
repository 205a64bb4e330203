"""The ``triton`` backend: fused Triton kernels (:mod:`.kernels`) and their launcher (:mod:`.backend`)."""
