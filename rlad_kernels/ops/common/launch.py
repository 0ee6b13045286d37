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
from .numerics import LogitMap


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
    group: int = 8             # row blocks that sweep the columns together (dlogits, the dW GEMM)
    split_v: int | None = None     # vocab splits in the forward; None = enough programs to fill the GPU
    scratch_bytes: int = 64 << 20  # bound on the backward's logit-gradient scratch buffer
    epilogue_block: int = 128      # token block of the combine kernels
    dw_block_m: int = 128      # the backward's GEMMs over the scratch (gemm.py): output rows x columns x step
    dw_block_n: int = 128
    dw_block_k: int = 32
    dw_num_warps: int = 8
    dw_num_stages: int = 3
    dw_split_k: int | None = None  # reduction splits of the backward GEMMs; None = enough to fill the GPU
    split_scratch: bool = True     # 16-bit inputs: the logit-gradient scratch as hi + lo parts (gemm.py)


# The defaults per GPU family and input dtype; why each tile (and what spilled): README.md, "How the tiles were chosen".
_F16_80 = TritonConfig(dw_block_n=64)
_F16_90 = TritonConfig()
_F32_80 = TritonConfig(block_n=64, block_v=32, block_h=16, num_stages=2, bwd_block_n=64, bwd_block_v=64,
                       bwd_block_h=32, bwd_num_stages=2, dw_block_m=64, dw_block_n=64, dw_num_stages=2)
_F16_100 = TritonConfig(block_n=128, block_v=32, block_h=16, num_stages=3, bwd_block_v=64)
_F32_90 = TritonConfig(block_n=32, block_v=32, block_h=32, num_stages=2)
_F32_100 = replace(_F32_90, bwd_block_v=64, bwd_block_h=32)
DEFAULTS = {(80, False): _F16_80, (80, True): _F32_80, (90, False): _F16_90, (90, True): _F32_90,
            (100, False): _F16_100, (100, True): _F32_100}

# The opt-in autotune space (RLAD_AUTOTUNE=1, see autotune.py): per family and dtype, overrides
# on top of the default (the first, empty one, is the default itself), each compiled by the test
# suite; what the pruning dropped: README.md, "How the tiles were chosen".
_SHARED = [{}, {"num_stages": 4, "bwd_num_stages": 4}, {"scratch_bytes": 256 << 20}, {"dw_block_k": 64},
           {"dw_block_n": 256}]
AUTOTUNE_SPACE = {
    (80, False): [c for c in _SHARED if "dw_block_k" not in c and "dw_block_n" not in c]
    + [{"block_n": 128, "block_v": 64}, {"bwd_block_n": 128, "bwd_block_v": 64}],
    (90, False): [c for c in _SHARED if "dw_block_k" not in c and "dw_block_n" not in c]
    + [{"block_n": 128, "block_v": 64}, {"block_h": 128, "num_stages": 2}, {"bwd_block_n": 128, "bwd_block_v": 64}],
    (100, False): [c for c in _SHARED if "num_stages" not in c] + [{"block_n": 64, "block_v": 128}],
    (80, True): [{}, {"block_n": 32, "block_v": 64, "num_stages": 3}, {"scratch_bytes": 256 << 20}],
    (90, True): [{}, {"num_stages": 3, "bwd_num_stages": 3}, {"scratch_bytes": 256 << 20}],
    (100, True): [{}, {"num_stages": 3, "bwd_num_stages": 3}, {"scratch_bytes": 256 << 20}],
}
_INTERPRET_DEFAULT = TritonConfig(block_n=16, block_v=32, block_h=32, bwd_block_n=16, bwd_block_v=32,
                                  bwd_block_h=32, epilogue_block=32, dw_block_m=32, dw_block_n=32, dw_block_k=16)
_overrides: dict = {}


def gpu_family(device: torch.device) -> int:
    """80, 90 or 100: the configuration family of a CUDA device (sm_8x and the consumer sm_12x
    take the sm_80 one). The compile report patches this to build configs for an absent GPU."""
    if device is None or device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(device)
    return {9: 90, 10: 100, 11: 100}.get(major, 80)


def get_config(device: torch.device | None = None, dtype: torch.dtype | None = None) -> TritonConfig:
    """The tile configuration of a launch on ``device`` with ``dtype`` inputs, with the fields set
    by ``triton_config`` applied on top."""
    if triton_interpreting():
        base = _INTERPRET_DEFAULT
    else:
        base = DEFAULTS[(gpu_family(device), dtype == torch.float32)]
    return replace(base, **_overrides) if _overrides else base


@contextlib.contextmanager
def triton_config(**kwargs):
    """Temporarily override tile options, e.g. ``with triton_config(split_v=3): ...`` (tests, tuning).
    The fields apply on top of every launch's per-device default; nested overrides merge."""
    global _overrides
    names = {f.name for f in fields(TritonConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown TritonConfig fields {sorted(unknown)}; known: {sorted(names)}")
    prev = _overrides
    _overrides = {**prev, **kwargs}
    try:
        yield get_config()
    finally:
        _overrides = prev


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


def num_sms(device: torch.device) -> int:
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
        split = max(1, min(triton.cdiv(2 * num_sms(device), blocks), tiles // 4 or 1))
    per = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, per)
    return ScanPlan(split, per, triton.cdiv(N, cfg.block_n if split == 1 else cfg.epilogue_block))


class Head(NamedTuple):
    """One lm_head as a kernel argument: ``z = (x @ w.T + b) * scale``, or with a soft cap
    ``z = cap_out * tanh((x @ w.T + b) * cap_in)`` (``numerics.LogitMap``; kernels take
    ``HAS_BIAS`` and ``SOFTCAP`` alongside, and ``b`` is a placeholder without a bias)."""

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    stride_xn: int
    stride_xh: int
    stride_wv: int
    stride_wh: int
    scale: float
    cap_in: float
    cap_out: float


def head(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lmap: LogitMap) -> Head:
    return Head(x, w, b if b is not None else x, x.stride(0), x.stride(1), w.stride(0), w.stride(1), *lmap)


def tiles(dtype: torch.dtype, cfg: TritonConfig, *, backward: bool = False) -> dict[str, Any]:
    """Tile constexprs and launch options of a forward (or backward) launch."""
    if backward:
        t = dict(BN=cfg.bwd_block_n, BV=cfg.bwd_block_v, BH=cfg.bwd_block_h,
                 num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    else:
        t = dict(BN=cfg.block_n, BV=cfg.block_v, BH=cfg.block_h, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(t, DOT_PRECISION=dot_precision(dtype), UPCAST=triton_interpreting())
