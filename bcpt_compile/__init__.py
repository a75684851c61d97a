"""bcpt-compile: a torch.compile backend for activation-sparse models.

``torch.compile(model, backend="bcpt")`` rewrites SBL masked matmuls into BCAT
block-sparse Triton kernels and hands everything else to Inductor unchanged.
"""

from ._logging import set_logging
from .backend import bcpt_backend
from .explain import explain
from .options import FAMILIES, BcptOptions
from .report import Report

__all__ = ["bcpt_backend", "explain", "set_logging", "BcptOptions", "Report", "FAMILIES"]
__version__ = "0.1.0"
