"""The per-token policy-loss math (TRRD / GRPO / KDRL), written once in torch.

``policy_token_loss`` is what the torch and naive implementations differentiate with autograd.
The Triton epilogue (``kernels.py``) evaluates the same formulas with their analytic derivative;
the test suite checks the two agree on every branch (clip sides, teacher clamp and its straight-through
variant, teacher gate, dual clip, KD estimators, ratio cap). ``TokenInputs`` (the per-token
constants) and ``STAT_FIELDS`` (the metric sums) are defined here once and used by every
implementation.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import NamedTuple

import torch

from ..common.numerics import log_weights
from .config import PolicyLossConfig

# Cap on log-ratios fed to exp(): r <= e^20 keeps r * A finite (no inf * 0 = NaN when A = 0).
LOG_RATIO_CAP = 20.0

# Sums over valid tokens that every implementation produces, in this order.
STAT_FIELDS = (
    "loss_sum",       # sum_t w_t * L_t
    "weight_sum",     # sum_t w_t (the default normalizer)
    "tokens",         # number of valid tokens
    "adv_pos",        # tokens with A > 0
    "adv_neg",        # tokens with A < 0
    "clip_pos",       # A > 0 tokens on the clipped branch (zero gradient)
    "clip_neg",       # A < 0 tokens on the clipped branch (CISPO: clip_pos / clip_neg count capped weights)
    "dual_clip",      # A < 0 tokens bounded by the dual clip
    "ratio",          # sum of r
    "teacher_clamp_hi",  # tokens clamped with lp - lp_T > teacher_clamp (student above teacher)
    "teacher_clamp_lo",  # tokens clamped with lp - lp_T < -teacher_clamp (student below teacher)
    "teacher_gate",   # tokens whose teacher term the gate dropped (gated TRRD)
    "teacher_gap",    # sum of lp_old - lp_T
    "entropy",        # sum of entropy
    "kd",             # sum of the KD estimator value
    "ref_kl",         # sum of k3(lp_ref - lp)
    "cispo_cap",      # tokens whose CISPO weight is capped (r > cispo_max), whatever the sign of A
)
STAT_INDEX = {name: i for i, name in enumerate(STAT_FIELDS)}
# The sums as a named tuple: the Triton epilogue builds one per token block and stores its fields in order.
Stats = namedtuple("Stats", STAT_FIELDS)


class TokenInputs(NamedTuple):
    """The per-token constants of the policy loss, each shaped like ``targets`` (None when absent).

    The same type carries them from the public function to every implementation: as tensors
    here, flattened per implementation, and in the Triton launch both as float32 ``[N]``
    pointers and as constexpr presence flags (``TokenInputs`` of bools). Adding a per-token
    input means a field here, its term in ``policy_token_loss`` and in the Triton epilogue
    (``kernels.py``), and its keyword in ``api.py``."""

    advantages: torch.Tensor
    old_logp: torch.Tensor
    teacher_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    kd_weights: torch.Tensor | None = None

    def map(self, fn) -> TokenInputs:
        """``fn`` applied to every present input (absent ones stay None)."""
        return TokenInputs(*(fn(t) if t is not None else None for t in self))

    def select(self, index) -> TokenInputs:
        """The same tokens' entries of every present input (``index``: a slice or index tensor)."""
        return self.map(lambda t: t[index])

    def present(self) -> TokenInputs:
        """Which inputs are given, as a ``TokenInputs`` of bools."""
        return TokenInputs(*(t is not None for t in self))


REQUIRED_INPUTS = ("advantages", "old_logp")


def used_inputs(tok: TokenInputs, cfg: PolicyLossConfig) -> TokenInputs:
    """``tok`` without the inputs the loss ignores under ``cfg`` (the reference log-probs when
    ``ref_kl_coef == 0``, the KD weights without a sampled-token KD estimator), so every
    implementation sees the same inputs and checks the same ones for non-finite values."""
    return tok._replace(ref_logp=tok.ref_logp if cfg.ref_kl_coef != 0.0 else None,
                        kd_weights=tok.kd_weights if cfg.kd_estimator not in (None, "full") else None)


def teacher_gate(A: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor,
                 cfg: PolicyLossConfig) -> torch.Tensor:
    """Where gated TRRD drops the teacher term: ``|lp_old - lp_T| > teacher_align_threshold`` (the
    rollout policy is not aligned with the teacher on this token) or ``|A| < teacher_adv_threshold``
    (too little reward signal to imitate on). Inputs only: the gate never depends on ``lp``."""
    gate = torch.zeros_like(A, dtype=torch.bool)
    if cfg.teacher_align_threshold is not None:
        gate = gate | ((old_logp - teacher_logp).abs() > cfg.teacher_align_threshold)
    if cfg.teacher_adv_threshold is not None:
        gate = gate | (A.abs() < cfg.teacher_adv_threshold)
    return gate


def sequence_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[R, L]`` -> ``[R, L]``: each row's mean of ``x`` over its valid tokens (0 for a row without
    any), on the row's valid tokens; 0 on ignored ones (``where``, so their values, even NaN, reach
    neither the mean nor its gradient). TRL's ``(x * mask).sum(-1) / mask.sum(-1).clamp(min=1)``."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, x, zero).sum(-1, keepdim=True) / n
    return torch.where(valid, mean, zero)


def policy_token_loss(logp: torch.Tensor, tok: TokenInputs, cfg: PolicyLossConfig,
                      entropy: torch.Tensor | None = None, valid: torch.Tensor | None = None):
    """Per-token loss ``L_t`` (differentiable in ``logp`` and ``entropy``) and per-token stats.

    All inputs share one shape and dtype (the compute dtype); ``tok`` holds only the inputs
    the loss uses (``used_inputs``). At sequence level (``cfg.ratio_level == "sequence"``) they
    are ``[R, L]``, one row per sequence, and ``valid`` (``[R, L]`` bool) marks the tokens the
    sequence ratio averages over. Returns ``(loss, stats)`` where ``stats`` maps the per-token
    STAT_FIELDS entries (except the weight sums) to detached tensors.
    """
    A, old_logp, teacher_logp, ref_logp = tok.advantages, tok.old_logp, tok.teacher_logp, tok.ref_logp
    clamp_hi = clamp_lo = gate = torch.zeros_like(logp, dtype=torch.bool)
    if teacher_logp is None:
        log_r = logp - old_logp
    else:
        if cfg.mixture == "geometric":
            d = logp - teacher_logp
            if cfg.teacher_clamp is not None:
                c = cfg.teacher_clamp
                clamp_hi, clamp_lo = d > c, d < -c
                d_c = torch.clamp(d, -c, c)
                # straight-through: the clamped value (plus an exact 0) with the unclamped derivative
                d = d_c.detach() + (d - d.detach()) if cfg.teacher_clamp_grad == "straight_through" else d_c
            log_r = cfg.alpha * (logp - old_logp) + (1.0 - cfg.alpha) * d
        else:  # arithmetic mixture: log m = logaddexp(log a + lp_old, log(1-a) + lp_T)
            log_a, log_1ma = log_weights(cfg.alpha)
            log_m = torch.logaddexp(old_logp + log_a, teacher_logp + log_1ma)
            log_r = logp - log_m
        if cfg.gated:  # gated TRRD: the GRPO ratio where the gate drops the teacher term
            gate = teacher_gate(A, old_logp, teacher_logp, cfg)
            log_r = torch.where(gate, logp - old_logp, log_r)
            clamp_hi, clamp_lo = clamp_hi & ~gate, clamp_lo & ~gate
    if cfg.sequence_level:  # GSPO: every token takes its sequence's mean log-ratio (gradient to all of them)
        log_r = sequence_mean(log_r, valid)

    ratio = torch.exp(torch.clamp(log_r, max=LOG_RATIO_CAP))
    dual_active = cispo_cap = torch.zeros_like(logp, dtype=torch.bool)
    if cfg.cispo:  # CISPO: REINFORCE with the capped ratio as a constant weight; no token loses its gradient
        clipped = cispo_cap = ratio > cfg.cispo_max
        loss = -torch.clamp(ratio, max=cfg.cispo_max).detach() * A * logp
    else:
        pg_unclipped = -A * ratio
        pg_clipped = -A * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        clipped = pg_clipped > pg_unclipped
        loss = torch.maximum(pg_unclipped, pg_clipped)
        if cfg.dual_clip is not None:
            pg_dual = -A * cfg.dual_clip
            dual_active = (A < 0) & (pg_dual < loss)
            loss = torch.where(A < 0, torch.minimum(loss, pg_dual), loss)

    zero = torch.zeros_like(logp)
    ref_kl = zero
    if ref_logp is not None:
        x = torch.clamp(ref_logp - logp, -LOG_RATIO_CAP, LOG_RATIO_CAP)
        ref_kl = torch.exp(x) - x - 1.0
        loss = loss + cfg.ref_kl_coef * ref_kl

    kd = zero
    if cfg.kd_estimator is not None:
        R = teacher_logp - logp
        if cfg.kd_estimator == "k1":
            kd = -R
        elif cfg.kd_estimator == "k2":
            kd = 0.5 * R * R
        elif cfg.kd_estimator == "k3":
            Rc = torch.clamp(R, -LOG_RATIO_CAP, LOG_RATIO_CAP)
            kd = torch.exp(Rc) - Rc - 1.0
        else:
            raise ValueError(f"unknown kd_estimator {cfg.kd_estimator!r}")
        w = tok.kd_weights if tok.kd_weights is not None else 1.0
        loss = loss + cfg.kd_coef * w * kd

    if entropy is not None and cfg.entropy_in_loss:  # (the token-mean bonus is added outside L_t)
        loss = loss - cfg.entropy_coef * entropy

    # A non-finite input must not vanish into a clip, clamp or cap: such tokens give NaN loss and
    # NaN gradient (so a NaN step is visible and can be skipped, never silently finite).
    bad = torch.zeros_like(clipped)
    for c in (A, old_logp, teacher_logp, ref_logp, tok.kd_weights):  # token_weights scale the loss, not the math
        if c is not None:
            bad = bad | ~torch.isfinite(c)
    if cfg.sequence_level:  # one bad token spoils its whole sequence's ratio (a -inf mean would give r = 0)
        bad = bad | (bad & valid).any(-1, keepdim=True)
    # multiply (not where): the selected NaN factor also makes d loss / d logp NaN for those tokens
    loss = loss * torch.where(bad, math.nan, 1.0)

    stats = {
        "adv_pos": (A > 0),
        "adv_neg": (A < 0),
        "clip_pos": (A > 0) & clipped,
        "clip_neg": (A < 0) & clipped,
        "dual_clip": dual_active,
        "ratio": ratio,
        "teacher_clamp_hi": clamp_hi,
        "teacher_clamp_lo": clamp_lo,
        "teacher_gate": gate,
        "teacher_gap": (old_logp - teacher_logp) if teacher_logp is not None else zero,
        "entropy": entropy if entropy is not None else zero,
        "kd": kd,
        "ref_kl": ref_kl,
        "cispo_cap": cispo_cap,
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def reduce_token_stats(loss: torch.Tensor, stats: dict[str, torch.Tensor], weights: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """Sums over valid tokens in STAT_FIELDS order -> float32 [len(STAT_FIELDS)].

    ``loss_sum`` stays differentiable; ignored tokens are dropped with ``where`` so garbage
    (even NaN) in ignored positions never leaks into the result.
    """
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    sums = [torch.where(valid, weights * loss, zero).sum(),
            torch.where(valid, weights, zero).sum().detach(),
            valid.sum().to(loss.dtype)]
    for name in STAT_FIELDS[3:]:
        v = stats[name].to(loss.dtype)
        sums.append(torch.where(valid, v, zero).sum())
    return torch.stack(sums)


def finalize_metrics(sums: torch.Tensor, cfg: PolicyLossConfig, *, has_teacher: bool, has_ref: bool,
                     has_entropy: bool) -> dict[str, torch.Tensor]:
    """Detached scalar metrics from the STAT_FIELDS sums (no host sync). The teacher metrics are
    reported only where the teacher acts in the ratio (``teacher_logp`` given and ``alpha < 1``;
    the clamp ones for the geometric mixture with a clamp, ``teacher_gate_frac`` when gated): with
    ``alpha == 1`` (GRPO, KDRL) the teacher is no part of the ratio and they would mislead."""
    s = {name: sums[i].detach().float() for i, name in enumerate(STAT_FIELDS)}
    one = torch.ones((), dtype=torch.float32, device=sums.device)
    tokens = torch.maximum(s["tokens"], one)
    m = {
        "num_tokens": s["tokens"],
        "clip_frac": (s["clip_pos"] + s["clip_neg"]) / tokens,
        "clip_frac_pos": s["clip_pos"] / torch.maximum(s["adv_pos"], one),
        "clip_frac_neg": s["clip_neg"] / torch.maximum(s["adv_neg"], one),
        "ratio_mean": s["ratio"] / tokens,
    }
    if cfg.dual_clip is not None:
        m["dual_clip_frac"] = s["dual_clip"] / torch.maximum(s["adv_neg"], one)
    if has_teacher and cfg.alpha < 1.0:  # teacher metrics only where the teacher acts in the ratio
        m["teacher_gap"] = s["teacher_gap"] / tokens
        if cfg.mixture == "geometric" and cfg.teacher_clamp is not None:
            m["teacher_clamp_frac"] = (s["teacher_clamp_hi"] + s["teacher_clamp_lo"]) / tokens
            m["teacher_clamp_hi"] = s["teacher_clamp_hi"] / tokens
            m["teacher_clamp_lo"] = s["teacher_clamp_lo"] / tokens
        if cfg.gated:
            m["teacher_gate_frac"] = s["teacher_gate"] / tokens
    if has_entropy:
        m["entropy_mean"] = s["entropy"] / tokens
    if cfg.kd_estimator is not None:
        m["kd_mean"] = s["kd"] / tokens
    if has_ref and cfg.ref_kl_coef != 0.0:
        m["ref_kl_mean"] = s["ref_kl"] / tokens
    if cfg.cispo:
        m["cispo_cap_frac"] = s["cispo_cap"] / tokens
    return m


def entropy_token_mean(entropy_sum: torch.Tensor, cfg: PolicyLossConfig,
                       entropy_normalizer: torch.Tensor) -> torch.Tensor:
    """The bonus of ``entropy_aggregation="token_mean"``: ``-entropy_coef * sum_t H_t / entropy_normalizer``
    (``linear_policy_loss`` defaults the normalizer to the call's number of valid tokens, or 1 when there is none)."""
    return -cfg.entropy_coef * entropy_sum / entropy_normalizer.to(entropy_sum.dtype)
