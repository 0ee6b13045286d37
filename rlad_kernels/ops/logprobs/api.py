"""Public entry point: ``linear_logprobs``."""

from __future__ import annotations

import torch

from ..common import autotune
from ..common.head import LMHead, legacy_head, reject_unknown
from ..common.inputs import LinearInputs, prepare_linear
from .chunked import logprobs_chunked
from .naive import linear_logprobs_naive
from .triton_impl import logprobs_triton


def logprobs_2d(li: LinearInputs, ignore_index: int, want_entropy: bool):
    """Dispatch on flattened inputs; returns (logp [N], entropy [N] | None)."""
    with torch.autocast(li.hidden.device.type, enabled=False):
        if li.impl == "naive":
            # the oracle applies logit_scale and temperature itself; scale folds both
            out = linear_logprobs_naive(li.hidden, li.weight, li.targets, bias=li.bias, temperature=li.temperature,
                                        logit_scale=li.logit_scale, ignore_index=ignore_index,
                                        return_entropy=want_entropy, softcap=li.softcap)
            return out if want_entropy else (out, None)
        if li.impl == "torch":
            return logprobs_chunked(li.hidden, li.weight, li.bias, li.targets, li.lmap, ignore_index, want_entropy)
        def tune_run():  # forward and backward on detached copies, for RLAD_AUTOTUNE=1
            h, w = li.hidden.detach().requires_grad_(), li.weight.detach().requires_grad_()
            lp, ent = logprobs_triton(h, w, li.bias, li.targets, li.lmap, ignore_index, want_entropy)
            (lp.sum() + (ent.sum() if ent is not None else 0)).backward()

        options = (li.bias is not None, want_entropy, li.lmap.capped)
        with autotune.scope(li.impl, "logprobs", li.hidden, li.weight, options, tune_run):
            return logprobs_triton(li.hidden, li.weight, li.bias, li.targets, li.lmap, ignore_index, want_entropy)


def linear_logprobs(hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False, impl: str | None = None, **legacy):
    """Per-token log-probabilities (and entropies) of ``targets`` under ``softmax(logits)``.

    ``logits = (hidden @ head.weight.T + head.bias) * head.logit_scale / temperature``, or with
    ``head.softcap = c`` ``c * tanh((hidden @ weight.T + bias) * logit_scale / c) / temperature``;
    never materialized (except by ``impl="naive"``).

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), float32/bf16/fp16
            (float64 with ``impl="torch"`` or ``"naive"``).
        head: the :class:`LMHead`: ``weight [V, H]`` (``model.get_output_embeddings().weight``),
            optional ``bias [V]``, ``logit_scale`` (> 0) and ``softcap`` (> 0 or None);
            ``LMHead.of(model)`` reads them from a ``transformers`` model.
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        temperature: divides the logits; use the sampler's temperature (> 0).
        ignore_index: target id of positions to skip: they give 0 and receive no gradient.
        return_entropy: also return the entropy of each position's distribution.
        impl: ``"triton"`` (fused kernels), ``"torch"`` (vocab-chunked, O(N) memory) or
            ``"naive"`` (materialized logits, the reference). Default: triton on CUDA, torch otherwise.

    Returns:
        ``logp [...]`` float32 (float64 for float64 inputs), and ``entropy [...]`` when
        ``return_entropy``. Both are differentiable w.r.t. ``hidden``, ``head.weight`` and ``head.bias``.

    The form of earlier releases, ``linear_logprobs(hidden, weight, targets, bias=..., logit_scale=...,
    softcap=...)``, still works for one release, with a ``DeprecationWarning``.
    """
    head = legacy_head("linear_logprobs", head, legacy)
    reject_unknown("linear_logprobs", legacy)
    li = prepare_linear(hidden, head, targets, temperature, ignore_index, impl)
    logp, ent = logprobs_2d(li, ignore_index, return_entropy)
    logp = logp.reshape(li.shape)
    if return_entropy:
        return logp, ent.reshape(li.shape)
    return logp
