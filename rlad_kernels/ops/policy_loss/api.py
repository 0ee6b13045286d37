"""Public entry point: ``linear_policy_loss`` (TRRD / GRPO / KDRL from hidden states).

Composes two other public APIs (the one exception to "an op imports only from common"):
``linear_logprobs`` scores the teacher's log-prob of the sampled tokens when only its hidden
states are given, and serves the naive reference; ``linear_divergence`` gives the exact
reverse KL of ``kd_estimator="full"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ...utils.validation import (
    as_normalizer,
    check_float_param,
    check_teacher,
    check_token_tensor,
    token_mean_normalizer,
)
from ..common import autotune
from ..common.inputs import LinearInputs, prepare_linear
from ..common.numerics import compute_dtype
from ..divergence.api import linear_divergence
from ..logprobs.api import linear_logprobs, logprobs_2d
from .chunked import policy_loss_chunked
from .config import PolicyLossConfig
from .math import (
    REQUIRED_INPUTS,
    STAT_INDEX,
    TokenInputs,
    entropy_token_mean,
    finalize_metrics,
    policy_token_loss,
    reduce_token_stats,
    used_inputs,
)
from .triton_impl import policy_loss_triton


@dataclass
class PolicyLossOutput:
    """``loss``: differentiable scalar. ``metrics``: detached scalars (no host sync).
    ``logp`` / ``entropy``: detached per-token values (shape of ``targets``), for logging or reuse."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor,
    *,
    teacher_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    kd_weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    config: PolicyLossConfig | None = None,
    impl: str | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    entropy_normalizer: float | torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Clipped, advantage-weighted policy loss (TRRD, GRPO/PPO-clip, KDRL) from hidden states.

    ``loss = sum_t w_t * L_t / normalizer`` over valid tokens (``targets != ignore_index``), with
    ``L_t`` as documented in :class:`PolicyLossConfig` and ``lp_t`` the log-prob of ``targets`` under
    ``softmax((hidden @ weight.T + bias) * logit_scale / temperature)``; with
    ``entropy_aggregation="token_mean"``, minus ``entropy_coef * sum_t H_t / entropy_normalizer``. The
    ``[N, V]`` logits are never materialized (except by ``impl="naive"``). GSPO (``ratio_level="sequence"``)
    takes every row of ``targets [..., L]`` as one sequence.

    Args:
        hidden: ``[..., H]`` student hidden states; weight ``[V, H]`` lm_head; targets ``[...]`` ids.
        advantages, old_logp: ``[...]`` per-token advantage and behaviour-policy log-prob.
        teacher_logp: ``[...]`` teacher log-prob of the same tokens: enables TRRD (and KD terms).
        ref_logp: ``[...]`` reference-policy log-prob, for ``ref_kl_coef``.
        token_weights: ``[...]`` ``w_t`` (default 1), e.g. ``1/|o_i|`` for sequence means.
        kd_weights: ``[...]`` per-token weight of the KD term (e.g. 0 on correct responses).
        normalizer: a number or scalar tensor dividing the weighted sum; default ``sum_t w_t``
            over valid tokens (token mean). Pass a global count for token-mean across
            micro-batches or ranks. Treated as a constant.
        config: :class:`PolicyLossConfig` (default: TRRD alpha=0.5, eps 0.2/0.2, clamp 1.0).
        impl: ``"triton"``, ``"torch"`` or ``"naive"``; default triton on CUDA, torch otherwise.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's final hidden states
            ``[..., H_t]`` and lm_head ``[V_t, H_t]`` (``V_t >= V``; a padded vocabulary is cut to
            V), detached. Required by ``kd_estimator="full"``, whose KD term is the exact
            reverse KL ``KL(p_student || p_teacher)`` over the whole vocabulary at every valid
            position (see :func:`rlad_kernels.linear_divergence`; same temperature). When
            ``teacher_logp`` is not given, it is computed
            from them (teacher log-prob of ``targets``) for the TRRD ratio and the metrics.
        softcap, teacher_softcap: the student's and the teacher's final-logit soft caps (Gemma 2/3's
            ``final_logit_softcapping``), or None: ``logits = c tanh(raw * logit_scale / c) / T``.
        teacher_logit_scale: the teacher's logit multiplier. The teacher's cap and scale apply
            where its logits are formed here (from ``teacher_hidden``).
        entropy_normalizer: with ``entropy_aggregation="token_mean"``, the number (or scalar tensor)
            dividing the entropy sum; default the call's number of valid tokens (1 if none). Pass
            the micro-batch's token count times the accumulation steps to reproduce TRL, or a
            global count. Treated as a constant; an error with ``entropy_aggregation="loss"``.

    All per-token inputs are constants of the loss (they must not require grad). Returns a
    :class:`PolicyLossOutput`; ``loss`` is differentiable w.r.t. hidden, weight and bias.
    """
    cfg = config if config is not None else PolicyLossConfig()
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    li = prepare_linear(hidden, weight, targets, bias, temperature, logit_scale, ignore_index, impl, softcap)
    check_float_param("teacher_softcap", teacher_softcap, positive=True, allow_none=True)
    check_float_param("teacher_logit_scale", teacher_logit_scale, positive=True)
    tok = TokenInputs(advantages=advantages, old_logp=old_logp, teacher_logp=teacher_logp, ref_logp=ref_logp,
                      token_weights=token_weights, kd_weights=kd_weights)
    for name, t in zip(TokenInputs._fields, tok, strict=True):
        check_token_tensor(name, t, li.shape, hidden.device, required=name in REQUIRED_INPUTS)
    full_kd = cfg.kd_estimator == "full"
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("pass teacher_hidden and teacher_weight together")
    if teacher_hidden is not None:
        check_teacher(teacher_hidden, teacher_weight, teacher_bias, li.shape, li.weight.shape[0], hidden.device)
    if full_kd and teacher_hidden is None:
        raise ValueError("kd_estimator='full' needs teacher_hidden and teacher_weight (the exact reverse KL "
                         "is computed over the teacher's whole vocabulary)")
    if cfg.kd_estimator is not None and teacher_logp is None and teacher_hidden is None:
        raise ValueError(f"kd_estimator={cfg.kd_estimator!r} needs teacher_logp (the KD term is a "
                         f"divergence to the teacher); pass teacher_logp or set kd_estimator=None")
    if cfg.ref_kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs ref_logp; pass ref_logp or set ref_kl_coef=0")
    if kd_weights is not None and cfg.kd_estimator is None:
        raise ValueError("kd_weights given but kd_estimator is None; set kd_estimator or drop kd_weights")
    if cfg.sequence_level and targets.dim() < 2:
        raise ValueError(f"ratio_level='sequence' needs targets of shape [..., L] with one sequence per row, got "
                         f"shape {tuple(targets.shape)}; reshape the tokens (and hidden, and every per-token "
                         f"input) to [B, L], padding with ignore_index")
    if entropy_normalizer is not None and cfg.entropy_aggregation != "token_mean":
        raise ValueError(f"entropy_normalizer is used only with entropy_aggregation='token_mean' (the config has "
                         f"{cfg.entropy_aggregation!r}); set it in PolicyLossConfig or drop entropy_normalizer")
    norm = as_normalizer(normalizer, hidden.device)
    ent_norm = as_normalizer(entropy_normalizer, hidden.device, "entropy_normalizer")
    if cfg.entropy_token_mean and ent_norm is None:  # the default: the call's valid tokens (1 when none)
        ent_norm = token_mean_normalizer((li.targets != ignore_index).sum().float())
    if teacher_logp is None and teacher_hidden is not None:
        V = li.weight.shape[0]
        with torch.no_grad():
            tok = tok._replace(teacher_logp=linear_logprobs(
                teacher_hidden, teacher_weight[:V], targets,
                bias=teacher_bias[:V] if teacher_bias is not None else None, temperature=temperature,
                logit_scale=teacher_logit_scale, ignore_index=ignore_index, softcap=teacher_softcap, impl=li.impl))
    tok = tok.map(lambda t: t.detach().reshape(-1))

    valid = li.targets != ignore_index
    if full_kd:  # the policy part without KD, then the exact KL term with the same normalizer
        core_cfg = replace(cfg, kd_estimator=None)
        cdt = compute_dtype(li.hidden.dtype)
        w = (tok.token_weights.to(cdt) if tok.token_weights is not None
             else torch.ones(valid.shape, dtype=cdt, device=hidden.device))
        if norm is None:
            norm = token_mean_normalizer(torch.where(valid, w, torch.zeros_like(w)).sum())
        loss, sums, lp, ent = _policy_core(li, used_inputs(tok, core_cfg), core_cfg, norm, ent_norm, ignore_index)
        kl = linear_divergence(hidden, weight, teacher_hidden, teacher_weight, kind="reverse_kl",
                               temperature=temperature, student_bias=bias, teacher_bias=teacher_bias,
                               student_softcap=softcap, teacher_softcap=teacher_softcap,
                               student_logit_scale=logit_scale, teacher_logit_scale=teacher_logit_scale,
                               mask=valid.reshape(li.shape), reduction="none", impl=li.impl).reshape(-1)
        kdw = tok.kd_weights.to(kl.dtype) if tok.kd_weights is not None else torch.ones_like(kl)
        kd_sum = torch.where(valid, w.to(kl.dtype) * kdw * kl, torch.zeros_like(kl)).sum()
        loss = loss + cfg.kd_coef * kd_sum / norm.to(kl.dtype)
        sums = sums.detach().clone()
        sums[STAT_INDEX["kd"]] = kl.detach().sum().to(sums.dtype)
    else:
        loss, sums, lp, ent = _policy_core(li, used_inputs(tok, cfg), cfg, norm, ent_norm, ignore_index)
    metrics = finalize_metrics(sums, cfg, has_teacher=tok.teacher_logp is not None, has_ref=ref_logp is not None,
                               has_entropy=cfg.needs_entropy)
    return PolicyLossOutput(loss=loss, metrics=metrics, logp=lp.reshape(li.shape),
                            entropy=ent.reshape(li.shape) if ent is not None else None)


def _policy_core(li: LinearInputs, tok: TokenInputs, cfg: PolicyLossConfig, norm, ent_norm, ignore_index: int):
    """(loss, STAT_FIELDS sums, logp [N], entropy [N] | None) of one implementation;
    ``tok``: the used per-token inputs, flattened to [N] and detached."""
    if li.impl == "naive" or cfg.sequence_level:
        return _policy_two_phase(li, tok, cfg, norm, ent_norm, ignore_index)
    if li.impl == "triton":
        tok32 = tok.map(lambda t: t.float().contiguous())

        def tune_run():  # forward and backward on detached copies, for RLAD_AUTOTUNE=1
            h, w = li.hidden.detach().requires_grad_(), li.weight.detach().requires_grad_()
            policy_loss_triton(h, w, li.bias, li.targets, tok32, norm, ent_norm, cfg, li.lmap,
                               ignore_index)[0].backward()

        options = (li.bias is not None, tok.present(), cfg)
        with (torch.autocast(li.hidden.device.type, enabled=False),
              autotune.scope(li.impl, "policy_loss", li.hidden, li.weight, options, tune_run)):
            return policy_loss_triton(li.hidden, li.weight, li.bias, li.targets, tok32, norm, ent_norm, cfg, li.lmap,
                                      ignore_index)
    with torch.autocast(li.hidden.device.type, enabled=False):
        return policy_loss_chunked(li.hidden, li.weight, li.bias, li.targets, tok, norm, ent_norm, cfg, li.lmap,
                                   ignore_index)


def _policy_two_phase(li: LinearInputs, tok: TokenInputs, cfg: PolicyLossConfig, norm, ent_norm, ignore_index: int):
    """Per-token log-probs (and entropies) from the ``linear_logprobs`` op of ``li.impl`` (its own
    backward; materialized logits only for naive), then the loss in torch, differentiated by autograd.

    The naive reference takes this path at token level; every implementation takes it at sequence
    level, where a token's loss needs the log-probs of its whole sequence (GSPO). Beyond the
    log-prob op, O(N) memory: ``[R, L]`` vectors."""
    lp, ent = logprobs_2d(li, ignore_index, cfg.needs_entropy)
    valid = li.targets != ignore_index
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    tok = tok.map(lambda t: torch.where(valid, t.to(lp.dtype), zero))  # ignored positions may hold anything
    rows = (lambda t: t.reshape(-1, li.shape[-1])) if cfg.sequence_level else (lambda t: t)
    loss_t, stats = policy_token_loss(rows(lp), tok.map(rows), cfg, entropy=rows(ent) if ent is not None else None,
                                      valid=rows(valid))
    w = tok.token_weights if tok.token_weights is not None else torch.ones_like(lp)
    sums = reduce_token_stats(loss_t, stats, rows(w), rows(valid))
    if norm is None:
        norm = token_mean_normalizer(sums[1])
    loss = sums[0] / norm.to(sums.dtype)
    if cfg.entropy_token_mean:
        loss = loss + entropy_token_mean(torch.where(valid, ent, zero).sum(), cfg, ent_norm)
    return loss, sums, lp.detach(), (ent.detach() if ent is not None else None)
