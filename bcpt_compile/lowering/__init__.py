"""torch.library custom ops (``torch.ops.bcpt.*``), one file per family.

Each op has a fake kernel (shapes for tracing), an autograd formula (its own sparse
backward, which AOTAutograd traces as a call to the backward op) and CPU and CUDA kernels.
"""

from . import sbl  # noqa: F401
from . import attention  # noqa: F401
from . import deepembed  # noqa: F401
