"""The ``bcpt_compile`` logger: silent by default, one switch to turn on.

``TORCH_LOGS="bcpt_compile"`` (torch._logging reads it when torch is imported, so the
module name, not a registered alias, is what works there), ``torch._logging.set_logs(bcpt=logging.INFO)``
after import, or ``bcpt_compile.set_logging(True)``.
"""

from __future__ import annotations

import logging

log = logging.getLogger("bcpt_compile")

try:  # torch._logging.set_logs(bcpt=logging.INFO)
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
