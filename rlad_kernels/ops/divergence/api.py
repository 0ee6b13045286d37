"""Public entry point: ``linear_divergence``."""

from __future__ import annotations

import torch

from ...utils.dispatch import resolve_impl
from ...utils.validation import (
    check_choice,
    check_float_param,
    check_linear_inputs,
    check_teacher,
    check_token_tensor,
)
from ..common import autotune
from ..common.head import LMHead, legacy_head, reject_unknown
from ..common.inputs import autocast_cast, rows
from ..common.normalizer import as_normalizer, token_mean_normalizer
from ..common.numerics import LogitMap
from .chunked import divergence_chunked
from .kinds import CODES, KINDS
from .naive import linear_divergence_naive
from .triton_impl import divergence_triton

REDUCTIONS = ("none", "sum", "mean")


def divergence_2d(hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, temperature: float, impl: str,
                  softcaps: tuple[float | None, float | None] = (None, None),
                  logit_scales: tuple[float, float] = (1.0, 1.0)):
    """Per-token divergence [N] of flattened, validated inputs (0 where ``valid`` is False)."""
    if kind == "jsd" and beta in (0.0, 1.0):  # GKD's endpoints: forward / reverse KL
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    with torch.autocast(hs.device.type, enabled=False):
        if impl == "naive":  # masked rows never enter the products (NaN padding cannot reach dW)
            hs, ht = (torch.where(valid[:, None], t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in (hs, ht))
            D = linear_divergence_naive(hs, ws, ht, wt, kind=kind, beta=beta, temperature=temperature,
                                        student_bias=bs, teacher_bias=bt, student_softcap=softcaps[0],
                                        teacher_softcap=softcaps[1], student_logit_scale=logit_scales[0],
                                        teacher_logit_scale=logit_scales[1])
            return torch.where(valid, D, torch.zeros_like(D))
        lmaps = tuple(LogitMap.of(s, temperature, c) for s, c in zip(logit_scales, softcaps, strict=True))
        args = (ht, wt, bt, valid, CODES[kind], float(beta), lmaps)
        if impl == "torch":
            return divergence_chunked(hs, ws, bs, *args)

        def tune_run():  # forward and backward on detached copies, for RLAD_AUTOTUNE=1
            divergence_triton(hs.detach().requires_grad_(), ws.detach().requires_grad_(), bs, *args).sum().backward()

        options = (bs is not None, bt is not None, kind, ht.shape[1], tuple(m.capped for m in lmaps))
        with autotune.scope(impl, "divergence", hs, ws, options, tune_run):
            return divergence_triton(hs, ws, bs, *args)


def linear_divergence(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
    **legacy,
) -> torch.Tensor:
    """Full-vocabulary divergence between the student's and the teacher's next-token distributions.

    ``p_s = softmax(logits_s)`` with ``logits_s`` from ``student_hidden`` and ``student_head``
    (``(h @ weight.T + bias) * logit_scale``, soft-capped when the head has a cap, over
    ``temperature``), ``p_t`` likewise from the teacher; neither ``[N, V]`` logits tensor is
    materialized (except by ``impl="naive"``).

    Args:
        student_hidden: ``[..., H_s]``; student_head: its :class:`LMHead` (``weight [V, H_s]``).
        teacher_hidden: ``[..., H_t]`` for the same tokens; teacher_head: its :class:`LMHead`
            (``weight [V_t, H_t]`` with ``V_t >= V``: a padded teacher vocabulary is cut to its
            first V columns and renormalized). Teacher tensors must not require grad.
        kind: ``"reverse_kl"`` KL(p_s || p_t), ``"forward_kl"`` KL(p_t || p_s), or ``"jsd"``:
            ``beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, ``M = beta p_t + (1 - beta) p_s``;
            ``beta = 0`` is forward KL and ``beta = 1`` reverse KL (special-cased, as in GKD).
        temperature: divides both logits (> 0).
        mask: ``[...]`` bool, False positions contribute 0 (default: all tokens).
        token_weights: ``[...]`` per-token weights ``w_t`` (default 1).
        normalizer: divides the weighted sum; default ``sum_t w_t`` over unmasked tokens for
            ``"mean"`` and 1 for ``"sum"``. A number or scalar tensor, treated as a constant.
        reduction: ``"none"`` -> per-token ``[...]``; ``"sum"`` / ``"mean"`` -> scalar
            ``sum_t w_t D_t / normalizer``.
        impl: ``"triton"``, ``"torch"`` (vocab-chunked) or ``"naive"``; default by device.

    Returns float32 (float64 for float64 inputs with torch/naive), differentiable w.r.t.
    ``student_hidden``, ``student_head.weight`` and ``student_head.bias``.

    The form of earlier releases (``student_weight`` / ``teacher_weight`` tensors with
    ``student_bias=``, ``teacher_softcap=``, ``student_logit_scale=`` ... keywords) still works for
    one release, with a ``DeprecationWarning``.
    """
    student_head = legacy_head("linear_divergence", student_head, legacy, prefix="student_", role="student_head")
    teacher_head = legacy_head("linear_divergence", teacher_head, legacy, prefix="teacher_", role="teacher_head")
    reject_unknown("linear_divergence", legacy)
    check_linear_inputs(student_hidden, student_head.weight, student_head.bias, hidden_name="student_hidden",
                        weight_name="student_weight", bias_name="student_bias")
    V = student_head.weight.shape[0]
    shape = student_hidden.shape[:-1]
    check_teacher(teacher_hidden, teacher_head.weight, teacher_head.bias, shape, V, student_hidden.device)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_float_param("beta", beta, low=0.0, high=1.0)
    check_float_param("temperature", temperature, positive=True)
    for who, h in (("student", student_head), ("teacher", teacher_head)):
        check_float_param(f"{who}_softcap", h.softcap, positive=True, allow_none=True)
        check_float_param(f"{who}_logit_scale", h.logit_scale, positive=True)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True = token counts)")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the tokens have shape {tuple(shape)}")
        if mask.device != student_hidden.device:
            raise ValueError(f"mask is on {mask.device} but student_hidden is on {student_hidden.device}")
    check_token_tensor("token_weights", token_weights, shape, student_hidden.device)
    norm = as_normalizer(normalizer, student_hidden.device)
    impl = resolve_impl(impl, student_hidden.device)

    hs, ws, bs, ht, wt, bt = autocast_cast(student_hidden.device.type, student_hidden, student_head.weight,
                                           student_head.bias, teacher_hidden, teacher_head.weight, teacher_head.bias)
    valid = (mask if mask is not None else torch.ones(shape, dtype=torch.bool, device=hs.device)).reshape(-1)
    D = divergence_2d(rows(hs), ws, bs, rows(ht), wt, bt, valid, kind, float(beta), float(temperature), impl,
                      (student_head.softcap, teacher_head.softcap),
                      (float(student_head.logit_scale), float(teacher_head.logit_scale)))
    if reduction == "none":
        return D.reshape(shape)
    zero = torch.zeros((), dtype=D.dtype, device=D.device)
    w = token_weights.detach().reshape(-1).to(D.dtype) if token_weights is not None else torch.ones_like(D)
    total = torch.where(valid, w * D, zero).sum()
    if norm is None:
        if reduction == "sum":
            return total
        norm = token_mean_normalizer(torch.where(valid, w, zero).sum())
    return total / norm.to(D.dtype)
