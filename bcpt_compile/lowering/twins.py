"""Opaque CPU twins of the ``triton_op`` s.

On CUDA, AOTAutograd traces a ``triton_op`` 's body, so Inductor sees its Triton launches
and runs them with its own launcher (and in CUDA graphs) instead of paying Python's launch
cost per kernel inside an opaque op. The Triton interpreter's kernels (CPU) cannot run on
fake tensors, so other devices go to an opaque ``<name>_cpu`` custom op with the same
schema and the same implementation.
"""

from __future__ import annotations

import torch


def signature_of(op) -> str:
    """``op``'s schema without its name, so the twin's signature is written once and the two
    ops cannot drift apart."""
    schema = str(op._opoverload._schema)
    return schema[schema.index("("):]


def cpu_twin(op, impl):
    """The opaque custom op ``<op's name>_cpu`` running ``impl``; register its fake kernel."""
    return torch.library.custom_op(f"{op._namespace}::{op._name}_cpu", mutates_args=(), schema=signature_of(op))(impl)
