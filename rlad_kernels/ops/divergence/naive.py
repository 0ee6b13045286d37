"""Reference teacher-student divergences: materializes both ``[N, V]`` logits. The test oracle.

float64 for float64 inputs, float32 otherwise; gradients from autograd.
"""

from __future__ import annotations

import torch

from ..common.numerics import compute_dtype, log_weights
from .kinds import KINDS


def _logits(h, w, b, V, temperature, softcap, logit_scale, cdt):
    z = h.to(cdt) @ w[:V].to(cdt).T
    if b is not None:
        z = z + b[:V].to(cdt)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _kl(logp_a, logp_b):
    """KL(a || b) per row from log-probabilities; 0 * log 0 counts as 0."""
    pa = logp_a.exp()
    return torch.where(pa == 0, torch.zeros_like(pa), pa * (logp_a - logp_b)).sum(-1)


def linear_divergence_naive(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind="reverse_kl",
                            beta=0.5, temperature=1.0, student_bias: torch.Tensor | None = None,
                            teacher_bias: torch.Tensor | None = None, student_softcap: float | None = None,
                            teacher_softcap: float | None = None, student_logit_scale: float = 1.0,
                            teacher_logit_scale: float = 1.0):
    """Per-token divergence ``[...]`` between softmax(student logits) and softmax(teacher logits),
    both over the student's V columns (a padded teacher vocabulary is cut to V and renormalized).

    reverse_kl: KL(p_s || p_t); forward_kl: KL(p_t || p_s); jsd: beta KL(p_t || M) + (1 - beta)
    KL(p_s || M) with M = beta p_t + (1 - beta) p_s, where beta = 0 is forward KL and beta = 1
    reverse KL (the generalized-JSD convention of GKD). Each side's logits are its raw output times
    its ``logit_scale``, soft-capped to ``c tanh(. / c)`` when it has a cap, over the temperature.
    """
    V = student_weight.shape[0]
    cdt = compute_dtype(student_hidden.dtype)
    ls = torch.log_softmax(_logits(student_hidden, student_weight, student_bias, V, temperature, student_softcap,
                                   student_logit_scale, cdt), -1)
    lt = torch.log_softmax(_logits(teacher_hidden, teacher_weight, teacher_bias, V, temperature, teacher_softcap,
                                   teacher_logit_scale, cdt), -1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "jsd":
        log_b, log_1mb = log_weights(beta)
        lm = torch.logaddexp(lt + log_b, ls + log_1mb)
        return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(map(repr, KINDS))}")
