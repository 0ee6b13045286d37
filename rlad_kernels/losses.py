"""``linear_policy_loss``: the public policy loss, composed of the three ops.

The policy-loss op (``ops/policy_loss``) fuses the clipped, advantage-weighted loss of the
per-token inputs with the lm_head at token level. What needs another op is composed here, so every
op imports only ``ops/common`` and ``utils``:

* the teacher's log-probs of the sampled tokens, from its hidden states and head (``linear_logprobs``);
* the naive reference and GSPO's sequence-level ratio: per-token log-probs from ``linear_logprobs``
  of the same ``impl``, then the loss in torch, differentiated by autograd;
* ``kd_estimator="full"``: the exact reverse KL over the whole vocabulary (``linear_divergence``),
  added with the loss's normalizer.

The per-token inputs travel as one ``TokenInputs`` from the caller to the Triton launch; adding
one is a field and its term in ``ops/policy_loss/math.py``, its term in the Triton epilogue
(``ops/policy_loss/kernels.py``), and where the caller computes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from .ops.common.head import LMHead, legacy_head, reject_unknown
from .ops.common.inputs import LinearInputs, prepare_linear
from .ops.common.normalizer import as_normalizer, token_mean_normalizer
from .ops.common.numerics import compute_dtype
from .ops.divergence.api import linear_divergence
from .ops.logprobs.api import linear_logprobs, logprobs_2d
from .ops.policy_loss.api import fused_policy_loss
from .ops.policy_loss.config import PolicyLossConfig
from .ops.policy_loss.math import (
    REQUIRED_INPUTS,
    STAT_INDEX,
    TokenInputs,
    entropy_token_mean,
    finalize_metrics,
    policy_token_loss,
    reduce_token_stats,
    used_inputs,
)
from .utils.validation import check_float_param, check_teacher, check_token_tensor


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
    head: LMHead,
    targets: torch.Tensor,
    inputs: TokenInputs | None = None,
    *legacy_args,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: LMHead | None = None,
    normalizer: float | torch.Tensor | None = None,
    entropy_normalizer: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    config: PolicyLossConfig | None = None,
    impl: str | None = None,
    **legacy,
) -> PolicyLossOutput:
    """Clipped, advantage-weighted policy loss (TRRD, GRPO/PPO-clip, KDRL) from hidden states.

    ``loss = sum_t w_t * L_t / normalizer`` over valid tokens (``targets != ignore_index``), with
    ``L_t`` as documented in :class:`PolicyLossConfig` and ``lp_t`` the log-prob of ``targets`` under
    the softmax of the head's logits over ``temperature``; with ``entropy_aggregation="token_mean"``,
    minus ``entropy_coef * sum_t H_t / entropy_normalizer``. The ``[N, V]`` logits are never
    materialized (except by ``impl="naive"``). GSPO (``ratio_level="sequence"``) takes every row of
    ``targets [..., L]`` as one sequence.

    Args:
        hidden: ``[..., H]`` student hidden states; head: its :class:`LMHead` (``weight [V, H]``,
            bias, logit scale, soft cap); targets: ``[...]`` token ids.
        inputs: :class:`TokenInputs`, each ``[...]`` like ``targets``: ``advantages`` and
            ``old_logp`` (behaviour-policy log-prob) required; ``teacher_logp`` enables TRRD (and
            KD terms); ``ref_logp`` for ``ref_kl_coef``; ``token_weights`` ``w_t`` (default 1,
            e.g. ``1/|o_i|`` for sequence means); ``kd_weights`` per-token weight of the KD term.
            All are constants of the loss (they must not require grad).
        teacher_hidden, teacher_head: the teacher's final hidden states ``[..., H_t]`` and its
            :class:`LMHead` (``weight [V_t, H_t]``, ``V_t >= V``; a padded vocabulary is cut to V),
            detached. Required by ``kd_estimator="full"``, whose KD term is the exact reverse KL
            ``KL(p_student || p_teacher)`` over the whole vocabulary at every valid position (see
            :func:`rlad_kernels.linear_divergence`; same temperature). When ``inputs.teacher_logp``
            is not given, it is computed from them for the TRRD ratio and the metrics.
        normalizer: a number or scalar tensor dividing the weighted sum; default ``sum_t w_t``
            over valid tokens (token mean). Pass a global count for token-mean across
            micro-batches or ranks. Treated as a constant.
        entropy_normalizer: with ``entropy_aggregation="token_mean"``, the number (or scalar tensor)
            dividing the entropy sum; default the call's number of valid tokens (1 if none). Pass
            the micro-batch's token count times the accumulation steps to reproduce TRL, or a
            global count. Treated as a constant; an error with ``entropy_aggregation="loss"``.
        temperature: the sampler's temperature (> 0), dividing both models' logits.
        config: :class:`PolicyLossConfig` (default: TRRD alpha=0.5, eps 0.2/0.2, clamp 1.0).
        impl: ``"triton"``, ``"torch"`` or ``"naive"``; default triton on CUDA, torch otherwise.

    Returns a :class:`PolicyLossOutput`; ``loss`` is differentiable w.r.t. hidden, head.weight and
    head.bias.

    The form of earlier releases, ``linear_policy_loss(hidden, weight, targets, advantages, old_logp,
    teacher_logp=..., bias=..., teacher_weight=..., ...)``, still works for one release, with a
    ``DeprecationWarning``.
    """
    head, inputs, teacher_head = _from_legacy(head, inputs, legacy_args, legacy, teacher_head)
    cfg = config if config is not None else PolicyLossConfig()
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    li = prepare_linear(hidden, head, targets, temperature, ignore_index, impl)
    tok = inputs
    for name, t in zip(TokenInputs._fields, tok, strict=True):
        check_token_tensor(name, t, li.shape, hidden.device, required=name in REQUIRED_INPUTS)
    full_kd = cfg.kd_estimator == "full"
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("pass teacher_hidden and teacher_head together")
    if teacher_hidden is not None:
        check_teacher(teacher_hidden, teacher_head.weight, teacher_head.bias, li.shape, li.weight.shape[0],
                      hidden.device)
        check_float_param("teacher_softcap", teacher_head.softcap, positive=True, allow_none=True)
        check_float_param("teacher_logit_scale", teacher_head.logit_scale, positive=True)
    if full_kd and teacher_hidden is None:
        raise ValueError("kd_estimator='full' needs teacher_hidden and teacher_head (the exact reverse KL "
                         "is computed over the teacher's whole vocabulary)")
    if cfg.kd_estimator is not None and tok.teacher_logp is None and teacher_hidden is None:
        raise ValueError(f"kd_estimator={cfg.kd_estimator!r} needs teacher_logp (the KD term is a "
                         f"divergence to the teacher); pass teacher_logp or set kd_estimator=None")
    if cfg.ref_kl_coef != 0.0 and tok.ref_logp is None:
        raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs ref_logp; pass ref_logp or set ref_kl_coef=0")
    if tok.kd_weights is not None and cfg.kd_estimator is None:
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
    if tok.teacher_logp is None and teacher_hidden is not None:
        V = li.weight.shape[0]
        cut = LMHead(teacher_head.weight[:V], teacher_head.bias[:V] if teacher_head.bias is not None else None,
                     teacher_head.logit_scale, teacher_head.softcap)
        with torch.no_grad():
            tok = tok._replace(teacher_logp=linear_logprobs(teacher_hidden, cut, targets, temperature=temperature,
                                                            ignore_index=ignore_index, impl=li.impl))
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
        kl = linear_divergence(hidden, head, teacher_hidden, teacher_head, kind="reverse_kl", temperature=temperature,
                               mask=valid.reshape(li.shape), reduction="none", impl=li.impl).reshape(-1)
        kdw = tok.kd_weights.to(kl.dtype) if tok.kd_weights is not None else torch.ones_like(kl)
        kd_sum = torch.where(valid, w.to(kl.dtype) * kdw * kl, torch.zeros_like(kl)).sum()
        loss = loss + cfg.kd_coef * kd_sum / norm.to(kl.dtype)
        sums = sums.detach().clone()
        sums[STAT_INDEX["kd"]] = kl.detach().sum().to(sums.dtype)
    else:
        loss, sums, lp, ent = _policy_core(li, used_inputs(tok, cfg), cfg, norm, ent_norm, ignore_index)
    metrics = finalize_metrics(sums, cfg, has_teacher=tok.teacher_logp is not None, has_ref=tok.ref_logp is not None,
                               has_entropy=cfg.needs_entropy)
    return PolicyLossOutput(loss=loss, metrics=metrics, logp=lp.reshape(li.shape),
                            entropy=ent.reshape(li.shape) if ent is not None else None)


_OLD_POSITIONAL = ("advantages", "old_logp")


def _from_legacy(head, inputs, legacy_args: tuple, legacy: dict, teacher_head):
    """(head, inputs, teacher_head) of a call in the current form, or of the form of earlier releases
    (the weight as a tensor, the per-token inputs as tensors and keywords, the teacher's head as
    ``teacher_weight=`` / ``teacher_bias=`` ... keywords), which warns."""
    op = "linear_policy_loss"
    head = legacy_head(op, head, legacy, stacklevel=4)
    per_token = [k for k in TokenInputs._fields if k in legacy]
    if isinstance(inputs, TokenInputs):
        if legacy_args or per_token:
            raise TypeError(f"{op}: the per-token inputs go in the TokenInputs only; got "
                            f"{', '.join(per_token) or 'extra positional arguments'} beside it")
    else:
        if inputs is not None or legacy_args or per_token:
            warnings.warn(f"{op}: passing the per-token inputs as separate tensors is deprecated and will be removed "
                          f"in the next release; pass inputs=TokenInputs(advantages=..., old_logp=..., ...)",
                          DeprecationWarning, stacklevel=3)
        positional = ((inputs,) if inputs is not None else ()) + tuple(legacy_args)
        if len(positional) > len(_OLD_POSITIONAL):
            raise TypeError(f"{op}() takes at most 5 positional arguments in its old form, got "
                            f"{3 + len(positional)}")
        values = dict(zip(_OLD_POSITIONAL, positional, strict=False))
        for name in TokenInputs._fields:
            if name in legacy:
                if name in values:
                    raise TypeError(f"{op}() got multiple values for argument {name!r}")
                values[name] = legacy.pop(name)
        missing = [k for k in REQUIRED_INPUTS if values.get(k) is None]
        if missing:
            raise TypeError(f"{op}() missing the per-token input(s) {', '.join(missing)}: pass "
                            f"inputs=TokenInputs(advantages=..., old_logp=...)")
        inputs = TokenInputs(**values)
    if "teacher_weight" in legacy:
        if teacher_head is not None:
            raise TypeError(f"{op}: teacher_weight is the old form of teacher_head; pass one of them")
        teacher_head = legacy_head(op, legacy.pop("teacher_weight"), legacy, prefix="teacher_", role="teacher_head",
                                   stacklevel=4)
    else:
        teacher_head = legacy_head(op, teacher_head, legacy, prefix="teacher_", role="teacher_head")
    reject_unknown(op, legacy)
    return head, inputs, teacher_head


def _policy_core(li: LinearInputs, tok: TokenInputs, cfg: PolicyLossConfig, norm, ent_norm, ignore_index: int):
    """(loss, STAT_FIELDS sums, logp [N], entropy [N] | None): the fused op at token level, the
    two-phase path for the naive reference and at sequence level."""
    if li.impl == "naive" or cfg.sequence_level:
        return _policy_two_phase(li, tok, cfg, norm, ent_norm, ignore_index)
    return fused_policy_loss(li, tok, cfg, norm, ent_norm, ignore_index)


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
