"""BCPT-Runtime: host-resident DeepEmbed tables, prefetched on a copy stream.

See ``engine`` for the copy machinery and ``ops`` for the custom ops graphs call.
"""

from . import ops  # noqa: F401  registers bcpt::row_plan / gather_rows / prefetch_rows / wait_rows
from .engine import RuntimeStats, configure, reset_stats, stats
from .offload import OffloadedEmbedding, offload_tables

__all__ = ["RuntimeStats", "configure", "reset_stats", "stats", "OffloadedEmbedding", "offload_tables"]
