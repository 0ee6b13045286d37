"""Host side of the Triton log-prob kernels: tile configuration, launches, autograd op.

Forward: one launch (plus a tiny combine launch when the vocabulary is split across programs
to fill the GPU at small N). Stored for backward: ``lse`` and ``E_p[z]`` per token (O(N)).

Backward: ``dlogits_kernel`` recomputes logit tiles into a bounded scratch buffer and
``ops/scratch_backward.py`` turns them into dX (per token chunk) and dW / db (per vocabulary
slice) with GEMMs: no N x V buffer, no float32 V x H buffer, 10*N*H*V FLOPs when both dX and
dW are needed (6 when only one is).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import triton

from ...utils.dispatch import triton_interpreting
from ..scratch_backward import scratch_backward
from . import kernels as K


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
    split_v: Optional[int] = None  # vocab splits in the forward; None = enough programs to fill the GPU
    scratch_bytes: int = 64 << 20  # bound on the backward's logit-gradient scratch buffer
    epilogue_block: int = 128      # token block of the combine kernels


_DEFAULT = TritonConfig()
_INTERPRET_DEFAULT = TritonConfig(block_n=16, block_v=32, block_h=32, bwd_block_n=16, bwd_block_v=32,
                                  bwd_block_h=32, epilogue_block=32)
_override: Optional[TritonConfig] = None


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


def choose_split(N: int, V: int, device: torch.device, cfg: TritonConfig) -> tuple[int, int]:
    """(splits, vocab tiles per split) so that token blocks x splits fill the GPU."""
    tiles = triton.cdiv(V, cfg.block_v)
    if cfg.split_v is not None:
        split = max(1, min(cfg.split_v, tiles))
    else:
        blocks = triton.cdiv(N, cfg.block_n)
        split = max(1, min(triton.cdiv(2 * _num_sms(device), blocks), tiles // 4 or 1))
    per = triton.cdiv(tiles, split)
    return triton.cdiv(tiles, per), per


_POLICY_PTRS = ("adv_ptr", "old_ptr", "teach_ptr", "ref_ptr", "tw_ptr", "kdw_ptr", "glp_ptr", "gent_ptr")
_POLICY_SCALARS = ("alpha", "eps_low", "eps_high", "clamp_c", "dual_c", "kd_coef", "ref_coef", "ent_coef",
                   "log_a", "log_1ma")
_POLICY_FLAGS = dict(TEACHER=0, HAS_CLAMP=False, HAS_DUAL=False, KD=0, HAS_REF=False, ENT_BONUS=False,
                     HAS_TW=False, HAS_KDW=False, NSTAT=1)


@dataclass
class Epilogue:
    """Arguments of the fused policy-loss epilogue, built by ``policy_loss.triton_impl``:
    ``pointers`` (``_POLICY_PTRS`` -> float32 [N] tensors; absent inputs may be any tensor, the
    flags compile them out), ``scalars`` (``_POLICY_SCALARS`` -> float), ``flags`` (constexprs)."""

    pointers: dict
    scalars: dict
    flags: dict


def forward_stats(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, scale: float,
                  ignore_index: int, want_entropy: bool, epilogue: Optional[Epilogue] = None,
                  cfg: Optional[TritonConfig] = None):
    """Run the forward kernel(s). Returns float32 (logp [N], entropy [N]|None, lse [N], ez [N]|None,
    stats) where ``stats`` is the [NSTAT] sum of the epilogue's per-block sums (None without it)."""
    cfg = cfg or get_config()
    N, H = x.shape
    V = w.shape[0]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    lp = torch.empty(N, **f32)
    lse = torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if want_entropy else None
    ez = torch.empty(N, **f32) if want_entropy else None
    if epilogue is None:
        policy = dict(POLICY=False, **_POLICY_FLAGS, **{k: lp for k in _POLICY_PTRS},
                      **{k: 0.0 for k in _POLICY_SCALARS})
        nstat = 0
    else:
        policy = dict(POLICY=True, **epilogue.flags, **epilogue.pointers, **epilogue.scalars)
        nstat = epilogue.flags["NSTAT"]
    if N == 0:
        return lp, ent, lse, ez, (torch.zeros(nstat, **f32) if epilogue is not None else None)
    split, per = choose_split(N, V, dev, cfg)
    nblk = triton.cdiv(N, cfg.block_n if split == 1 else cfg.epilogue_block)
    stat = torch.empty((nblk, max(nstat, 1)), **f32)
    if split > 1:
        partials = dict(zip(("pm_ptr", "pl_ptr", "ps_ptr", "pt_ptr"),
                            (torch.empty((split, N), **f32) for _ in range(4))))
    else:
        partials = dict(pm_ptr=lp, pl_ptr=lp, ps_ptr=lp, pt_ptr=lp)  # unused
    rows = dict(lp_ptr=lp, ent_ptr=ent if ent is not None else lp, lse_ptr=lse,
                ez_ptr=ez if ez is not None else lp, stat_ptr=stat)
    K.lm_head_fwd_kernel[(triton.cdiv(N, cfg.block_n) * split,)](
        x, w, b if b is not None else x, y, **rows, **partials, **policy,
        N=N, V=V, H=H, stride_xn=x.stride(0), stride_xh=x.stride(1), stride_wv=w.stride(0),
        stride_wh=w.stride(1), scale=scale, ignore_index=ignore_index, tiles_per_split=per,
        HAS_BIAS=b is not None, ENTROPY=want_entropy, SPLIT=split,
        BN=cfg.block_n, BV=cfg.block_v, BH=cfg.block_h,
        DOT_PRECISION=dot_precision(x.dtype), UPCAST=triton_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        K.lm_head_combine_kernel[(nblk,)](
            y, **rows, **partials, **policy, N=N, V=V, ignore_index=ignore_index,
            ENTROPY=want_entropy, SPLIT=split, BN=cfg.epilogue_block,
        )
    return lp, ent, lse, ez, (stat.sum(0) if epilogue is not None else None)


def _launch_dlogits(x, w, b, y, lse, ez, g_lp, g_ent, dl, row0, n_rows, col0, n_cols, scale, ignore_index,
                    cfg: TritonConfig):
    grid = (triton.cdiv(n_rows, cfg.bwd_block_n) * triton.cdiv(n_cols, cfg.bwd_block_v),)
    K.dlogits_kernel[grid](
        x, w, b if b is not None else x, y, lse, ez if ez is not None else lse, g_lp,
        g_ent if g_ent is not None else g_lp, dl,
        row0, n_rows, col0, n_cols, x.shape[1], x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        dl.stride(0), dl.stride(1), scale, ignore_index,
        HAS_BIAS=b is not None, HAS_GENT=g_ent is not None, GROUP=cfg.group,
        BN=cfg.bwd_block_n, BV=cfg.bwd_block_v, BH=cfg.bwd_block_h,
        DOT_PRECISION=dot_precision(x.dtype), UPCAST=triton_interpreting(),
        num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
    )


def backward_grads(x, w, b, y, lse, ez, g_lp, g_ent, scale, ignore_index, need_dx, need_dw, need_db,
                   cfg: Optional[TritonConfig] = None):
    """dX [N, H] (x.dtype), dW [V, H] (w.dtype), db [V] (b.dtype) for upstream per-token g_lp, g_ent."""
    cfg = cfg or get_config()
    g_lp = g_lp.contiguous().float()
    g_ent = g_ent.contiguous().float() if g_ent is not None else None

    def fill(dl, row0, n_rows, col0, n_cols):
        _launch_dlogits(x, w, b, y, lse, ez, g_lp, g_ent, dl, row0, n_rows, col0, n_cols, scale, ignore_index, cfg)

    return scratch_backward(x, w, b.dtype if b is not None else None, fill, need_dx=need_dx, need_dw=need_dw,
                            need_db=need_db, scratch_bytes=cfg.scratch_bytes, row_align=cfg.bwd_block_n,
                            col_align=cfg.bwd_block_v)


class TritonLogprobs(torch.autograd.Function):
    """Autograd op over 2-D ``hidden [N, H]`` and 1-D ``targets [N]``; returns (logp, entropy|None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, ignore_index: int, want_entropy: bool):
        lp, ent, lse, ez, _ = forward_stats(hidden, weight, bias, targets, scale, ignore_index, want_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ez)
        ctx.scale, ctx.ignore_index = scale, ignore_index
        return lp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ez = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        if ez is None:
            g_ent = None
        dx, dw, db = backward_grads(hidden, weight, bias, targets, lse, ez, g_logp, g_ent, ctx.scale,
                                    ctx.ignore_index, need_dx, need_dw, need_db)
        return dx, dw, db, None, None, None, None


def linear_logprobs_triton(hidden2d, weight, bias, targets1d, scale, ignore_index, want_entropy):
    check_triton_dtypes(hidden2d, weight)
    return TritonLogprobs.apply(hidden2d, weight, bias, targets1d, scale, ignore_index, want_entropy)
