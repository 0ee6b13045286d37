"""Public entry point: ``linear_policy_loss`` (TRRD / GRPO / KDRL from hidden states)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from ...utils.validation import check_float_param, check_token_tensor
from ..logprobs.api import logprobs_2d, prepare_linear
from .config import PolicyLossConfig
from .math import finalize_metrics, policy_token_loss, reduce_token_stats
from .triton_impl import policy_loss_triton

_TOKEN_INPUTS = ("advantages", "old_logp", "teacher_logp", "ref_logp", "token_weights", "kd_weights")


@dataclass
class PolicyLossOutput:
    """``loss``: differentiable scalar. ``metrics``: detached scalars (no host sync).
    ``logp`` / ``entropy``: detached per-token values (shape of ``targets``), for logging or reuse."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


def _normalizer(normalizer, device) -> Optional[torch.Tensor]:
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or not normalizer.is_floating_point():
            raise ValueError(f"normalizer must be a number or a 1-element float tensor, got shape "
                             f"{tuple(normalizer.shape)} dtype {normalizer.dtype}")
        if normalizer.device != device:
            raise ValueError(f"normalizer is on {normalizer.device} but hidden is on {device}")
        return normalizer.detach().reshape(()).float()
    check_float_param("normalizer", normalizer, positive=True)
    return torch.tensor(float(normalizer), dtype=torch.float32, device=device)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor,
    *,
    teacher_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    kd_weights: Optional[torch.Tensor] = None,
    normalizer: Union[None, float, torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    config: Optional[PolicyLossConfig] = None,
    impl: Optional[str] = None,
) -> PolicyLossOutput:
    """Clipped, advantage-weighted policy loss (TRRD, GRPO/PPO-clip, KDRL) from hidden states.

    ``loss = sum_t w_t * L_t / normalizer`` over valid tokens (``targets != ignore_index``), with
    ``L_t`` as documented in :class:`PolicyLossConfig` and ``lp_t`` the log-prob of ``targets`` under
    ``softmax((hidden @ weight.T + bias) * logit_scale / temperature)``. The ``[N, V]`` logits are
    never materialized (except by ``impl="naive"``).

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

    All per-token inputs are constants of the loss (they must not require grad). Returns a
    :class:`PolicyLossOutput`; ``loss`` is differentiable w.r.t. hidden, weight and bias.
    """
    cfg = config if config is not None else PolicyLossConfig()
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    li = prepare_linear(hidden, weight, targets, bias, temperature, logit_scale, ignore_index, impl)
    given = dict(advantages=advantages, old_logp=old_logp, teacher_logp=teacher_logp, ref_logp=ref_logp,
                 token_weights=token_weights, kd_weights=kd_weights)
    for name in _TOKEN_INPUTS:
        check_token_tensor(name, given[name], li.shape, hidden.device, required=name in ("advantages", "old_logp"))
    if cfg.kd_estimator is not None and teacher_logp is None:
        raise ValueError(f"kd_estimator={cfg.kd_estimator!r} needs teacher_logp (the KD term is a "
                         f"divergence to the teacher); pass teacher_logp or set kd_estimator=None")
    if cfg.ref_kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs ref_logp; pass ref_logp or set ref_kl_coef=0")
    if kd_weights is not None and cfg.kd_estimator is None:
        raise ValueError("kd_weights given but kd_estimator is None; set kd_estimator or drop kd_weights")
    norm = _normalizer(normalizer, hidden.device)
    has_teacher, has_ref = teacher_logp is not None, ref_logp is not None

    if li.impl == "triton":
        tok = {k: (v.detach().reshape(-1).float().contiguous() if v is not None else None)
               for k, v in given.items()}
        with torch.autocast(hidden.device.type, enabled=False):
            loss, sums, lp, ent = policy_loss_triton(li.hidden, li.weight, li.bias, li.targets, tok, norm, cfg,
                                                     li.scale, ignore_index)
    else:
        lp, ent = logprobs_2d(li, ignore_index, cfg.needs_entropy)
        tok = {k: (v.detach().reshape(-1).to(lp.dtype) if v is not None else None) for k, v in given.items()}
        valid = li.targets != ignore_index
        loss_t, stats = policy_token_loss(lp, tok["advantages"], tok["old_logp"], cfg,
                                          teacher_logp=tok["teacher_logp"], ref_logp=tok["ref_logp"],
                                          entropy=ent, kd_weights=tok["kd_weights"])
        w = tok["token_weights"] if tok["token_weights"] is not None else torch.ones_like(lp)
        sums = reduce_token_stats(loss_t, stats, w, valid)
        if norm is None:
            wsum = sums[1]
            norm = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
        loss = sums[0] / norm.to(sums.dtype)
        lp, ent = lp.detach(), (ent.detach() if ent is not None else None)
    metrics = finalize_metrics(sums, cfg, has_teacher=has_teacher, has_ref=has_ref,
                               has_entropy=cfg.needs_entropy)
    return PolicyLossOutput(loss=loss, metrics=metrics, logp=lp.reshape(li.shape),
                            entropy=ent.reshape(li.shape) if ent is not None else None)
