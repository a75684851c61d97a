"""Tests run the real Triton kernels on CPU through the interpreter, at small sizes.

TRITON_INTERPRET must be set before triton is imported, hence here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
