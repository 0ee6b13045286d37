"""Test setup shared by the whole suite.

* Without CUDA, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
  before any kernel module is imported, so it is set here, first. With CUDA the same tests run
  the kernels on the GPU: every test that calls ``impl="triton"`` takes the ``device`` fixture.
* ``torch.empty`` / ``torch.empty_like`` are poisoned with NaN (floating dtypes) for the whole
  session, so an output element a kernel forgot to write fails the comparison loudly.
* ``small_chunks`` shrinks every tile of the torch paths, so the tests' odd shapes run several
  token and vocabulary chunks with ragged last ones.

Constants the test modules share (``DEVICE``, the tolerances ``TOL``, ``DTYPES``) live in
``helpers.py``: test modules import them from there, never from a conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rlad_kernels.ops.common.chunked import CHUNKS  # noqa: E402

from helpers import DEVICE  # noqa: E402

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


@pytest.fixture
def small_chunks(monkeypatch):
    """Torch-path tiles of 8 tokens x 40 vocabulary columns, and a policy-loss block of 4 KiB
    (5 to 27 tokens at the tests' vocabularies), instead of 1024 x 8192 and 64 MiB."""
    monkeypatch.setattr(CHUNKS, "tokens", 8)
    monkeypatch.setattr(CHUNKS, "vocab", 40)
    monkeypatch.setattr(CHUNKS, "block_bytes", 4096)
    return CHUNKS
