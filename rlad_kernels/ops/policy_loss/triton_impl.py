"""Host side of the fused Triton policy loss: one forward pass, gradient factors kept per token."""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ...utils.dispatch import triton_interpreting
from ..logprobs.triton_impl import backward_grads, check_triton_dtypes, choose_split, dot_precision, get_config
from . import kernels as K
from .config import PolicyLossConfig
from .math import STAT_FIELDS

_KD_CODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


def _scalars(cfg: PolicyLossConfig):
    log_a = math.log(cfg.alpha) if cfg.alpha > 0 else -math.inf
    log_1ma = math.log1p(-cfg.alpha) if cfg.alpha < 1 else -math.inf
    return (float(cfg.alpha), float(cfg.eps_low), float(cfg.eps_high),
            float(cfg.teacher_clamp or 0.0), float(cfg.dual_clip or 0.0), float(cfg.kd_coef),
            float(cfg.ref_kl_coef), float(cfg.entropy_coef), log_a, log_1ma)


def policy_forward(x, w, b, y, tok, cfg: PolicyLossConfig, scale: float, ignore_index: int):
    """tok: dict of float32 [N] tensors (advantages, old_logp, teacher_logp, ref_logp, token_weights,
    kd_weights; optional ones may be None). Returns per-token (lp, ent, lse, ez, glp, gent) and stats
    sums [NSTAT]."""
    tc = get_config()
    N, H = x.shape
    V = w.shape[0]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    want_ent = cfg.needs_entropy
    ent_bonus = cfg.entropy_coef != 0.0
    teacher = tok["teacher_logp"]
    ref = tok["ref_logp"] if cfg.ref_kl_coef != 0.0 else None
    flags = dict(
        TEACHER=0 if teacher is None else (1 if cfg.mixture == "geometric" else 2),
        HAS_CLAMP=cfg.teacher_clamp is not None, HAS_DUAL=cfg.dual_clip is not None,
        KD=_KD_CODES[cfg.kd_estimator], HAS_REF=ref is not None, ENT_BONUS=ent_bonus,
        HAS_TW=tok["token_weights"] is not None, HAS_KDW=tok["kd_weights"] is not None,
        NSTAT=len(STAT_FIELDS),
    )
    lp = torch.empty(N, **f32)
    lse = torch.empty(N, **f32)
    glp = torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if want_ent else None
    ez = torch.empty(N, **f32) if want_ent else None
    gent = torch.empty(N, **f32) if ent_bonus else None
    adv = tok["advantages"]

    def p(t):  # placeholder pointer for absent optional inputs (never read: constexpr-gated)
        return t if t is not None else adv

    inputs = (adv, tok["old_logp"], p(teacher), p(ref), p(tok["token_weights"]), p(tok["kd_weights"]))
    outs = (lp, ent if ent is not None else lp, lse, ez if ez is not None else lp, glp,
            gent if gent is not None else glp)
    if N == 0:
        return lp, ent, lse, ez, glp, gent, torch.zeros(len(STAT_FIELDS), **f32)
    split, per = choose_split(N, V, dev, tc)
    if split == 1:
        nblk = triton.cdiv(N, tc.block_n)
        stats = torch.empty((nblk, len(STAT_FIELDS)), **f32)
        partials = (lp, lp, lp, lp)
    else:
        nblk = triton.cdiv(N, tc.epilogue_block)
        stats = torch.empty((nblk, len(STAT_FIELDS)), **f32)
        partials = tuple(torch.empty((split, N), **f32) for _ in range(4))
    K.policy_fwd_kernel[(triton.cdiv(N, tc.block_n) * split,)](
        x, w, b if b is not None else x, y, *inputs, *outs, stats, *partials,
        N, V, H, x.stride(0), x.stride(1), w.stride(0), w.stride(1), scale, ignore_index, per,
        *_scalars(cfg),
        HAS_BIAS=b is not None, ENTROPY=want_ent, SPLIT=split, **flags,
        BN=tc.block_n, BV=tc.block_v, BH=tc.block_h,
        DOT_PRECISION=dot_precision(x.dtype), UPCAST=triton_interpreting(),
        num_warps=tc.num_warps, num_stages=tc.num_stages,
    )
    if split > 1:
        K.policy_combine_kernel[(nblk,)](
            y, *inputs, *outs, stats, *partials, N, V, ignore_index, *_scalars(cfg),
            ENTROPY=want_ent, SPLIT=split, **flags, BN=tc.epilogue_block,
        )
    return lp, ent, lse, ez, glp, gent, stats.sum(0)


class TritonPolicyLoss(torch.autograd.Function):
    """Returns (loss, stat sums, logp, entropy|None); only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok, normalizer: Optional[torch.Tensor],
                cfg: PolicyLossConfig, scale: float, ignore_index: int):
        lp, ent, lse, ez, glp, gent, sums = policy_forward(hidden, weight, bias, targets, tok, cfg, scale,
                                                           ignore_index)
        if normalizer is None:
            wsum = sums[1]
            normalizer = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
        loss = sums[0] / normalizer
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ez, glp, gent, normalizer)
        ctx.scale, ctx.ignore_index = scale, ignore_index
        ctx.mark_non_differentiable(sums, lp, *([ent] if ent is not None else []))
        return loss, sums, lp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_sums, _g_lp, _g_ent):
        hidden, weight, bias, targets, lse, ez, glp, gent, normalizer = ctx.saved_tensors
        factor = g_loss / normalizer
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        dx, dw, db = backward_grads(hidden, weight, bias, targets, lse, ez if gent is not None else None,
                                    glp * factor, gent * factor if gent is not None else None, ctx.scale,
                                    ctx.ignore_index, need_dx, need_dw, need_db)
        return dx, dw, db, None, None, None, None, None, None


def policy_loss_triton(x, w, b, y, tok, normalizer, cfg, scale, ignore_index):
    check_triton_dtypes(x, w)
    return TritonPolicyLoss.apply(x, w, b, y, tok, normalizer, cfg, scale, ignore_index)
