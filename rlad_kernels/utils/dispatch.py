"""Choosing an implementation: ``impl=None`` means Triton on CUDA, the chunked torch path elsewhere."""

from __future__ import annotations

import os

import torch

from .validation import IMPLS, check_choice


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def resolve_impl(impl: str | None, device: torch.device) -> str:
    if impl is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    check_choice("impl", impl, IMPLS)
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package; pip install triton, or use impl='torch'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {device.type}); use impl='torch' on this device, "
                f"or set TRITON_INTERPRET=1 before importing rlad_kernels to run the kernels in Triton's "
                f"CPU interpreter (slow; meant for tests)")
    return impl
