"""The ``impl="triton"`` path of the policy loss, host side: one forward pass, gradient factors
kept per token.

``epilogue_args`` is the one place where the config and the per-token inputs become the
epilogue's kernel arguments (pointers, coefficients, constexpr flags).
"""

from __future__ import annotations

import math

import torch

from ..common.autograd import first_order_only
from ..common.launch import check_triton_dtypes, get_config, scan_plan
from ..common.logprob import Rows, logprob_backward, logprob_forward
from ..common.normalizer import token_mean_normalizer
from ..common.numerics import LogitMap, log_weights
from .config import PolicyLossConfig
from .kernels import EpilogueCoefs, EpilogueFlags, EpilogueOut, policy_combine_kernel, policy_fwd_kernel
from .math import STAT_FIELDS, STAT_INDEX, TokenInputs, entropy_token_mean

_KD_CODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


def epilogue_args(tok: TokenInputs, cfg: PolicyLossConfig, N: int, blocks: int, device) -> dict:
    """Kernel arguments of the policy epilogue. ``tok``: float32 [N] tensors (the inputs the
    loss uses). Allocates the per-token gradient factors (``glp``, and ``gent`` with an
    entropy bonus) and the per-block sums."""
    f32 = dict(dtype=torch.float32, device=device)
    ent_bonus = cfg.entropy_in_loss  # (the token-mean bonus is outside L_t: its factors are formed on the host)
    glp = torch.empty(N, **f32)
    out = EpilogueOut(glp=glp, gent=torch.empty(N, **f32) if ent_bonus else glp,
                      stat=torch.empty((blocks, len(STAT_FIELDS)), **f32))
    log_a, log_1ma = log_weights(cfg.alpha)
    coef = EpilogueCoefs(alpha=float(cfg.alpha), eps_low=float(cfg.eps_low), eps_high=float(cfg.eps_high),
                         clamp_c=float(cfg.teacher_clamp or 0.0),
                         clamp_slope=1.0 if cfg.teacher_clamp_grad == "straight_through" else float(cfg.alpha),
                         align_c=float(cfg.teacher_align_threshold if cfg.teacher_align_threshold is not None
                                       else math.inf),
                         adv_c=float(cfg.teacher_adv_threshold or 0.0), dual_c=float(cfg.dual_clip or 0.0),
                         kd_coef=float(cfg.kd_coef), ref_coef=float(cfg.ref_kl_coef), ent_coef=float(cfg.entropy_coef),
                         log_a=log_a, log_1ma=log_1ma, cispo_max=float(cfg.cispo_max))
    flags = EpilogueFlags(ARITHMETIC=cfg.mixture == "arithmetic", HAS_CLAMP=cfg.teacher_clamp is not None,
                          GATE=cfg.gated and tok.teacher_logp is not None,
                          HAS_DUAL=cfg.dual_clip is not None, KD=_KD_CODES[cfg.kd_estimator], ENT_BONUS=ent_bonus,
                          CISPO=cfg.cispo)
    # absent inputs: any float32 [N] tensor will do, their presence flags compile the loads out
    ptrs = TokenInputs(*(t if t is not None else tok.advantages for t in tok))
    return dict(tok=ptrs, coef=coef, out=out, HAS=tok.present(), EPI=flags)


class TritonPolicyLoss(torch.autograd.Function):
    """Returns (loss, stat sums, logp, entropy|None); only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok: TokenInputs, normalizer: torch.Tensor | None,
                ent_norm: torch.Tensor | None, cfg: PolicyLossConfig, lmap: LogitMap, ignore_index: int):
        cfg_t = get_config(hidden.device, hidden.dtype)
        N = hidden.shape[0]
        plan = scan_plan(N, weight.shape[0], hidden.device, cfg_t)
        epi = epilogue_args(tok, cfg, N, plan.blocks, hidden.device)
        rows = logprob_forward(policy_fwd_kernel, policy_combine_kernel, hidden, weight, bias, targets, lmap,
                               ignore_index, cfg.needs_entropy, plan, cfg_t, **epi)
        out = epi["out"]
        sums = out.stat.sum(0)
        gent = out.gent if epi["EPI"].ENT_BONUS else None
        if normalizer is None:
            normalizer = token_mean_normalizer(sums[1])
        loss = sums[0] / normalizer
        ent_scale = normalizer  # the backward scales gent by grad_output / ent_scale
        if cfg.entropy_token_mean:  # -entropy_coef * sum_t H_t / entropy_normalizer, outside the epilogue
            loss = loss + entropy_token_mean(sums[STAT_INDEX["entropy"]], cfg, ent_norm)
            gent = torch.full_like(out.glp, -cfg.entropy_coef)  # the backward kernel reads it on valid rows only
            ent_scale = ent_norm
        ctx.save_for_backward(hidden, weight, bias, targets, out.glp, gent, normalizer, ent_scale, *rows)
        ctx.lmap, ctx.ignore_index, ctx.cfg = lmap, ignore_index, cfg_t  # the backward tiles as the forward's
        ctx.mark_non_differentiable(sums, rows.lp, *([rows.ent] if rows.ent is not None else []))
        return loss, sums, rows.lp, rows.ent

    @staticmethod
    @first_order_only("linear_policy_loss(impl='triton')")
    def backward(ctx, g_loss, _g_sums, _g_lp, _g_ent):
        hidden, weight, bias, targets, glp, gent, normalizer, ent_scale, *saved = ctx.saved_tensors
        factor = g_loss / normalizer
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        g_ent = gent * (g_loss / ent_scale) if gent is not None else None
        dx, dw, db = logprob_backward(hidden, weight, bias, targets, Rows(*saved), glp * factor, g_ent, ctx.lmap,
                                      ctx.ignore_index, need_dx, need_dw, need_db, ctx.cfg)
        return dx, dw, db, None, None, None, None, None, None, None


def policy_loss_triton(x, w, b, y, tok: TokenInputs, normalizer, ent_norm, cfg, lmap: LogitMap, ignore_index):
    """``tok``: the used per-token inputs, as float32 [N] contiguous tensors; ``ent_norm``: the
    entropy normalizer of ``entropy_aggregation="token_mean"`` (None: the number of valid tokens)."""
    check_triton_dtypes(x, w)
    return TritonPolicyLoss.apply(x, w, b, y, tok, normalizer, ent_norm, cfg, lmap, ignore_index)
