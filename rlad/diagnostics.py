"""What TRRD does to each token of a batch, and how far an update moved the policy.

The study's questions (docs/studies.md, "The fair study") are about mechanisms: does the teacher's
anchor change which tokens the clip stops, and does the trust region bind? These functions answer
them per step from the batch's per-token log-probs. With TRRD's ratio
``log r = alpha (lp - lp_old) + (1 - alpha) clamp(lp - lp_T, -c, c)``, a token starts its update
(``lp = lp_old``) at the anchor shift ``s = (1 - alpha) clamp(lp_old - lp_T, -c, c)``:

- ``trrd_zeroed_frac``: of the tokens with A > 0, those whose shift alone is past the upper clip,
  ``s > log(1 + eps_high)``: the student already above the teacher there, so TRRD gives them no
  gradient (GRPO would push them up);
- ``trrd_protected_frac``: of the tokens with A < 0, those below the lower clip from the start,
  ``s < log(1 - eps_low)``: the teacher prefers them, so TRRD does not push them down (GRPO would);
- ``teacher_pref_frac``: of the tokens with A < 0, the teacher-preferred ones,
  ``lp_old - lp_T < TEACHER_PREFERRED``: where the protection above can act at the paper's settings
  (the study's precondition asks for at least 10%);
- ``room_used``: of the tokens with A > 0 that the teacher prefers, those whose log-prob rose past
  GRPO's clip after the update, ``lp_new - lp_old > log(1 + eps_high)``: the extra room TRRD's
  lowered anchor gives, used (needs the post-update log-probs);
- ``kl_old_new``: KL(old || new) over the batch's tokens after the last optimizer step, with the
  k3 estimator ``r - 1 - log r``, ``r = p_new / p_old`` (unbiased on tokens sampled from old;
  Schulman, "Approximating KL divergence", 2020).

Each fraction is a mean over the named tokens of the step's loss tokens; the metric is left out of
a step that has no such token (``host_metrics`` drops weight-0 metrics).
"""

from __future__ import annotations

import math

import torch

# lp_old - lp_T below this: the teacher prefers the token enough that TRRD at the paper's settings
# (alpha 0.5, c = 1, eps_low 0.2) protects it under A < 0: 0.5 * gap < log(0.8) (about -0.446)
TEACHER_PREFERRED = 2 * math.log(0.8)


def anchor_shift(old_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float,
                 clamp: float | None) -> torch.Tensor:
    """TRRD's log-ratio at ``lp = lp_old``: ``(1 - alpha) clamp(lp_old - lp_T, -c, c)``."""
    gap = old_logp - teacher_logp
    if clamp is not None:
        gap = gap.clamp(-clamp, clamp)
    return (1.0 - alpha) * gap


def trrd_token_stats(advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                     teacher_logp: torch.Tensor, *, alpha: float, clamp: float | None, eps_low: float,
                     eps_high: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``trrd_zeroed_frac``, ``trrd_protected_frac`` and ``teacher_pref_frac`` of one batch, each
    as ``(fraction, count of the tokens it is a fraction of)`` (tensors on the batch's device)."""
    pos, neg = mask & (advantages > 0), mask & (advantages < 0)
    s = anchor_shift(old_logp, teacher_logp, alpha, clamp)
    preferred = (old_logp - teacher_logp) < TEACHER_PREFERRED
    return {"trrd_zeroed_frac": _share(s > math.log1p(eps_high), pos),
            "trrd_protected_frac": _share(s < math.log1p(-eps_low), neg),
            "teacher_pref_frac": _share(preferred, neg)}


def update_stats(advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor, new_logp: torch.Tensor,
                 teacher_logp: torch.Tensor | None, *, eps_high: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``kl_old_new`` and, with the teacher's log-probs, ``room_used``, as ``(value, count)``."""
    d = (new_logp - old_logp).double()
    k3 = torch.expm1(d) - d
    out = {"kl_old_new": _mean(k3, mask)}
    if teacher_logp is not None:
        chosen = mask & (advantages > 0) & ((old_logp - teacher_logp) < TEACHER_PREFERRED)
        out["room_used"] = _share(d > math.log1p(eps_high), chosen)
    return out


def _share(flags: torch.Tensor, among: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _mean(flags.double(), among)


def _mean(values: torch.Tensor, among: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = among.sum()
    return torch.where(among, values, 0.0).sum() / n.clamp_min(1), n
