"""Host side of the Triton kernels that every op shares: tile configuration, vocabulary split,
and the ``Head`` kernel argument.

One ``TritonConfig`` drives every launch; ``triton_config(...)`` overrides it temporarily
(tests, tuning). Under ``TRITON_INTERPRET=1`` small tiles keep the CPU interpreter fast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import triton

from ...utils.dispatch import triton_interpreting


@dataclass(frozen=True)
class TritonConfig:
    """Tile shapes and launch options of the fused kernels."""

    block_n: int = 64          # forward token block
    block_v: int = 128         # forward vocab tile
    block_h: int = 64          # reduction step over H
    num_warps: int = 8
    num_stages: int = 3
    bwd_block_n: int = 64      # dlogits tile
    bwd_block_v: int = 128
    bwd_block_h: int = 64
    bwd_num_warps: int = 8
    bwd_num_stages: int = 3
    group: int = 8             # row blocks that sweep the columns together in dlogits
    split_v: int | None = None     # vocab splits in the forward; None = enough programs to fill the GPU
    scratch_bytes: int = 64 << 20  # bound on the backward's logit-gradient scratch buffer
    epilogue_block: int = 128      # token block of the combine kernels


_DEFAULT = TritonConfig()
_INTERPRET_DEFAULT = TritonConfig(block_n=16, block_v=32, block_h=32, bwd_block_n=16, bwd_block_v=32,
                                  bwd_block_h=32, epilogue_block=32)
_override: TritonConfig | None = None


def get_config() -> TritonConfig:
    if _override is not None:
        return _override
    return _INTERPRET_DEFAULT if triton_interpreting() else _DEFAULT


@contextlib.contextmanager
def triton_config(**kwargs):
    """Temporarily override tile options, e.g. ``with triton_config(split_v=3): ...`` (tests, tuning)."""
    global _override
    names = {f.name for f in fields(TritonConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown TritonConfig fields {sorted(unknown)}; known: {sorted(names)}")
    prev = _override
    _override = replace(get_config(), **kwargs)
    try:
        yield _override
    finally:
        _override = prev


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs follow torch's matmul precision setting (tf32 only if the user allowed it);
    16-bit inputs take Triton's default (the setting only concerns float32 operands)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_triton_dtypes(hidden: torch.Tensor, weight: torch.Tensor, prefix: str = "") -> None:
    ok = (torch.float32, torch.bfloat16, torch.float16)
    for name, t in ((prefix + "hidden", hidden), (prefix + "weight", weight)):
        if t.dtype not in ok:
            raise TypeError(f"impl='triton' supports float32/bfloat16/float16 {name}, got {t.dtype}; "
                            f"use impl='torch' or impl='naive' for {t.dtype}")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


class ScanPlan(NamedTuple):
    """How a forward pass over the vocabulary is laid out: ``split`` programs per token block,
    each streaming ``tiles_per_split`` vocab tiles; ``blocks`` token blocks finish the rows
    (in the scan launch when ``split == 1``, else in the combine launch)."""

    split: int
    tiles_per_split: int
    blocks: int


def scan_plan(N: int, V: int, device: torch.device, cfg: TritonConfig) -> ScanPlan:
    """Split the vocabulary so that token blocks x splits fill the GPU."""
    tiles = triton.cdiv(V, cfg.block_v)
    if cfg.split_v is not None:
        split = max(1, min(cfg.split_v, tiles))
    else:
        blocks = max(1, triton.cdiv(N, cfg.block_n))
        split = max(1, min(triton.cdiv(2 * _num_sms(device), blocks), tiles // 4 or 1))
    per = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, per)
    return ScanPlan(split, per, triton.cdiv(N, cfg.block_n if split == 1 else cfg.epilogue_block))


class Head(NamedTuple):
    """One lm_head as a kernel argument: ``z = (x @ w.T + b) * scale`` (``b`` is a placeholder
    when the head has no bias; kernels take ``HAS_BIAS`` alongside)."""

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    stride_xn: int
    stride_xh: int
    stride_wv: int
    stride_wh: int
    scale: float


def head(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float) -> Head:
    return Head(x, w, b if b is not None else x, x.stride(0), x.stride(1), w.stride(0), w.stride(1), float(scale))


def tiles(dtype: torch.dtype, cfg: TritonConfig, *, backward: bool = False) -> dict[str, Any]:
    """Tile constexprs and launch options of a forward (or backward) launch."""
    if backward:
        t = dict(BN=cfg.bwd_block_n, BV=cfg.bwd_block_v, BH=cfg.bwd_block_h,
                 num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    else:
        t = dict(BN=cfg.block_n, BV=cfg.block_v, BH=cfg.block_h, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(t, DOT_PRECISION=dot_precision(dtype), UPCAST=triton_interpreting())
