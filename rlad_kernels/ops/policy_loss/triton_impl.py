"""Host side of the fused Triton policy loss: one forward pass, gradient factors kept per token."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...utils.validation import token_mean_normalizer
from ..logprobs.triton_impl import Epilogue, backward_grads, check_triton_dtypes, forward_stats
from .config import PolicyLossConfig
from .math import STAT_FIELDS

_KD_CODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


def make_epilogue(tok, cfg: PolicyLossConfig, N: int, device) -> Epilogue:
    """tok: float32 [N] tensors (advantages, old_logp, teacher_logp, ref_logp, token_weights,
    kd_weights; optional ones None). Allocates the per-token gradient factors glp (and gent)."""
    adv = tok["advantages"]
    teacher = tok["teacher_logp"]
    ref = tok["ref_logp"] if cfg.ref_kl_coef != 0.0 else None
    ent_bonus = cfg.entropy_coef != 0.0
    glp = torch.empty(N, dtype=torch.float32, device=device)
    gent = torch.empty(N, dtype=torch.float32, device=device) if ent_bonus else None

    def p(t):  # absent inputs: any tensor will do, the flags compile the loads out
        return t if t is not None else adv

    pointers = dict(adv_ptr=adv, old_ptr=tok["old_logp"], teach_ptr=p(teacher), ref_ptr=p(ref),
                    tw_ptr=p(tok["token_weights"]), kdw_ptr=p(tok["kd_weights"]), glp_ptr=glp, gent_ptr=p(gent))
    scalars = dict(alpha=float(cfg.alpha), eps_low=float(cfg.eps_low), eps_high=float(cfg.eps_high),
                   clamp_c=float(cfg.teacher_clamp or 0.0), dual_c=float(cfg.dual_clip or 0.0),
                   kd_coef=float(cfg.kd_coef), ref_coef=float(cfg.ref_kl_coef), ent_coef=float(cfg.entropy_coef),
                   log_a=math.log(cfg.alpha) if cfg.alpha > 0 else -math.inf,
                   log_1ma=math.log1p(-cfg.alpha) if cfg.alpha < 1 else -math.inf)
    flags = dict(TEACHER=0 if teacher is None else (1 if cfg.mixture == "geometric" else 2),
                 HAS_CLAMP=cfg.teacher_clamp is not None, HAS_DUAL=cfg.dual_clip is not None,
                 KD=_KD_CODES[cfg.kd_estimator], HAS_REF=ref is not None, ENT_BONUS=ent_bonus,
                 HAS_TW=tok["token_weights"] is not None, HAS_KDW=tok["kd_weights"] is not None,
                 NSTAT=len(STAT_FIELDS))
    return Epilogue(pointers=pointers, scalars=scalars, flags=flags)


class TritonPolicyLoss(torch.autograd.Function):
    """Returns (loss, stat sums, logp, entropy|None); only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok, normalizer: Optional[torch.Tensor],
                cfg: PolicyLossConfig, scale: float, ignore_index: int):
        epi = make_epilogue(tok, cfg, hidden.shape[0], hidden.device)
        lp, ent, lse, ez, sums = forward_stats(hidden, weight, bias, targets, scale, ignore_index,
                                               cfg.needs_entropy, epilogue=epi)
        glp = epi.pointers["glp_ptr"]
        gent = epi.pointers["gent_ptr"] if epi.flags["ENT_BONUS"] else None
        if normalizer is None:
            normalizer = token_mean_normalizer(sums[1])
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
