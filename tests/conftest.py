"""Test setup shared by the whole suite.

* Without CUDA, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
  before any kernel module is imported, so it is set here, first.
* ``torch.empty`` / ``torch.empty_like`` are poisoned with NaN (floating dtypes) for the whole
  session, so an output element a kernel forgot to write fails the comparison loudly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _nan_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True, scope="session")
def poison_empty():
    torch.empty = _nan_empty
    torch.empty_like = _nan_empty_like
    try:
        yield
    finally:
        torch.empty = _real_empty
        torch.empty_like = _real_empty_like


@pytest.fixture
def device():
    return DEVICE
