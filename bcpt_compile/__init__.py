"""bcpt-compile: a torch.compile backend for activation-sparse models.

``torch.compile(model, backend="bcpt")`` rewrites SBL masked matmuls into BCAT
block-sparse Triton kernels and hands everything else to Inductor unchanged.
"""

from . import lowering  # noqa: F401  registers torch.ops.bcpt.*
from ._logging import set_logging
from .backend import bcpt_backend
from .explain import explain
from .options import FAMILIES, BcptOptions
from .report import Report

__all__ = ["bcpt_backend", "explain", "set_logging", "BcptOptions", "Report", "FAMILIES"]
__version__ = "0.1.0"


def _register_backend_name() -> None:
    """Also register by name on import, for checkouts used through PYTHONPATH (no entry point)."""
    from importlib.metadata import entry_points

    import torch

    if entry_points(group="torch_dynamo_backends", name="bcpt"):
        return  # installed: Dynamo resolves the name through the entry point itself
    try:
        torch._dynamo.register_backend(bcpt_backend, name="bcpt")
    except Exception:  # registered already
        pass


_register_backend_name()
