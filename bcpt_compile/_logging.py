"""The ``bcpt_compile`` logger: silent by default, one switch to turn on.

``TORCH_LOGS="bcpt"`` (through torch._logging) or ``bcpt_compile.set_logging(True)``.
"""

from __future__ import annotations

import logging

log = logging.getLogger("bcpt_compile")

try:  # let TORCH_LOGS="bcpt" / torch._logging.set_logs(bcpt=logging.INFO) reach us
    from torch._logging._internal import register_log

    register_log("bcpt", "bcpt_compile")
except Exception:  # pragma: no cover - private API moved
    pass


def set_logging(enabled: bool = True, level: int = logging.INFO) -> None:
    """Print bcpt's decisions (matches, near-misses, pass failures) to stderr."""
    if enabled:
        if not any(getattr(h, "_bcpt", False) for h in log.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[bcpt] %(levelname)s %(message)s"))
            handler._bcpt = True  # type: ignore[attr-defined]
            log.addHandler(handler)
        log.setLevel(level)
    else:
        for h in [h for h in log.handlers if getattr(h, "_bcpt", False)]:
            log.removeHandler(h)
        log.setLevel(logging.WARNING)
