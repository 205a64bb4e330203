"""``visattn bench``: check every implementation against the oracle, then time and measure it.

* :func:`run_bench` on a :class:`BenchProblem` compares our registered backends with NATTEN,
  FlexAttention (eager and compiled), dense SDPA and a plain gather (see :mod:`.peers`);
  :mod:`.report` renders the result as a table, JSON or a plot.
* :func:`run_zoo` times every registered attention module (``visattn.nn.list_attn()``).

Heavy or optional imports (natten, matplotlib, rich, the profiler) happen only when used.
"""

from .peers import Built, Peer, default_peers
from .problem import BenchProblem, default_shape
from .runner import BenchResult, Row, run_bench
from .zoo import ZooRow, run_zoo

__all__ = ["BenchProblem", "BenchResult", "Built", "Peer", "Row", "ZooRow", "default_peers", "default_shape",
           "run_bench", "run_zoo"]
