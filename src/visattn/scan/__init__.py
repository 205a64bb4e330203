"""Selective state-space scans (Mamba's S6) and the routes that turn a 2-D map into scan sequences.

* :func:`selective_scan`: ``mamba-ssm``'s ``selective_scan_fn`` on every device: a fused C kernel on
  CPU (:mod:`.cpu`), a chunked PyTorch scan anywhere (:mod:`.chunked`), one autograd/compiler
  boundary (:mod:`.ops`); :func:`selective_scan_reference` is the sequential definition they are
  tested against.
* :mod:`.routes`: row/column-major, reversed, snake, diagonal, spiral, dilation-group (atrous) and
  windowed orders of a map's tokens, and :func:`~.routes.scan_routes` / :func:`~.routes.merge_routes`
  to gather ``[B, H, W, C]`` along them and scatter the results back.
"""

from .functional import selective_scan
from .reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]
