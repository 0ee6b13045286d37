"""Public entry point: ``linear_logprobs``."""

from __future__ import annotations

import torch

from ..common import autotune
from ..common.inputs import LinearInputs, prepare_linear
from .chunked import linear_logprobs_chunked
from .naive import linear_logprobs_naive
from .triton_impl import linear_logprobs_triton


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
            return linear_logprobs_chunked(li.hidden, li.weight, li.bias, li.targets, li.lmap, ignore_index,
                                           want_entropy)
        def tune_run():  # forward and backward on detached copies, for RLAD_AUTOTUNE=1
            h, w = li.hidden.detach().requires_grad_(), li.weight.detach().requires_grad_()
            lp, ent = linear_logprobs_triton(h, w, li.bias, li.targets, li.lmap, ignore_index, want_entropy)
            (lp.sum() + (ent.sum() if ent is not None else 0)).backward()

        options = (li.bias is not None, want_entropy, li.lmap.capped)
        with autotune.scope(li.impl, "logprobs", li.hidden, li.weight, options, tune_run):
            return linear_logprobs_triton(li.hidden, li.weight, li.bias, li.targets, li.lmap, ignore_index,
                                          want_entropy)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False, softcap: float | None = None,
                    impl: str | None = None):
    """Per-token log-probabilities (and entropies) of ``targets`` under ``softmax(logits)``.

    ``logits = (hidden @ weight.T + bias) * logit_scale / temperature``, or with ``softcap=c``
    ``c * tanh((hidden @ weight.T + bias) * logit_scale / c) / temperature``; never materialized
    (except by ``impl="naive"``).

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), float32/bf16/fp16
            (float64 with ``impl="torch"`` or ``"naive"``).
        weight: ``[V, H]`` lm_head weight (``model.get_output_embeddings().weight``).
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` lm_head bias.
        temperature: divides the logits; use the sampler's temperature (> 0).
        logit_scale: multiplies the logits (> 0), for models that scale their logits.
        ignore_index: target id of positions to skip: they give 0 and receive no gradient.
        return_entropy: also return the entropy of each position's distribution.
        softcap: the model's final-logit soft cap ``c > 0`` (Gemma 2/3's
            ``config.final_logit_softcapping``), or None; applied before the temperature.
        impl: ``"triton"`` (fused kernels), ``"torch"`` (vocab-chunked, O(N) memory) or
            ``"naive"`` (materialized logits, the reference). Default: triton on CUDA, torch otherwise.

    Returns:
        ``logp [...]`` float32 (float64 for float64 inputs), and ``entropy [...]`` when
        ``return_entropy``. Both are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    li = prepare_linear(hidden, weight, targets, bias, temperature, logit_scale, ignore_index, impl, softcap)
    logp, ent = logprobs_2d(li, ignore_index, return_entropy)
    logp = logp.reshape(li.shape)
    if return_entropy:
        return logp, ent.reshape(li.shape)
    return logp
