"""BCPT-Runtime: host-resident DeepEmbed tables, prefetched on a copy stream.

See ``plan`` for row plans, ``engine`` for the copy machinery, ``ops`` for the custom ops
graphs call and how a host table's gradient is delivered, ``fused`` for fused row optimizers.
"""

from . import ops  # noqa: F401  registers bcpt::row_plan / gather_rows / prefetch_rows / wait_rows
from .engine import RuntimeStats, configure, reset_stats, stats
from .fused import FusedRowOptimizer
from .offload import OffloadedEmbedding, offload_tables

__all__ = [
           "FusedRowOptimizer",
           "OffloadedEmbedding",
           "RuntimeStats",
           "configure",
           "offload_tables",
           "reset_stats",
           "stats",
]
