"""Public entry point: ``linear_logprobs``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...utils.dispatch import resolve_impl
from ...utils.validation import check_float_param, check_linear_inputs, check_targets
from .chunked import linear_logprobs_chunked
from .naive import linear_logprobs_naive
from .triton_impl import linear_logprobs_triton


@dataclass
class LinearInputs:
    """Validated, flattened inputs of a fused lm_head op."""

    hidden: torch.Tensor        # [N, H], contiguous
    weight: torch.Tensor        # [V, H]
    bias: Optional[torch.Tensor]
    targets: torch.Tensor       # [N] int64
    scale: float                # logit_scale / temperature
    shape: torch.Size           # leading shape of the inputs (targets.shape)
    impl: str


def prepare_linear(hidden, weight, targets, bias, temperature, logit_scale, ignore_index, impl) -> LinearInputs:
    check_linear_inputs(hidden, weight, bias)
    check_float_param("temperature", temperature, positive=True)
    check_float_param("logit_scale", logit_scale, positive=True)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device)
    impl = resolve_impl(impl, hidden.device)
    if torch.is_autocast_enabled(hidden.device.type):  # compute in the autocast dtype, as F.linear would
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    H = hidden.shape[-1]
    return LinearInputs(
        hidden=hidden.reshape(-1, H).contiguous(),
        weight=weight,
        bias=bias,
        targets=targets.reshape(-1).to(torch.long).contiguous(),
        scale=float(logit_scale) / float(temperature),
        shape=targets.shape,
        impl=impl,
    )


def logprobs_2d(li: LinearInputs, ignore_index: int, want_entropy: bool):
    """Dispatch on flattened inputs; returns (logp [N], entropy [N] | None)."""
    with torch.autocast(li.hidden.device.type, enabled=False):
        if li.impl == "naive":
            # the oracle applies logit_scale and temperature itself; scale folds both
            out = linear_logprobs_naive(li.hidden, li.weight, li.targets, bias=li.bias, logit_scale=li.scale,
                                        ignore_index=ignore_index, return_entropy=want_entropy)
            return out if want_entropy else (out, None)
        if li.impl == "torch":
            return linear_logprobs_chunked(li.hidden, li.weight, li.bias, li.targets, li.scale, ignore_index,
                                           want_entropy)
        return linear_logprobs_triton(li.hidden, li.weight, li.bias, li.targets, li.scale, ignore_index,
                                      want_entropy)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, logit_scale: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False, impl: Optional[str] = None):
    """Per-token log-probabilities (and entropies) of ``targets`` under ``softmax(logits)``.

    ``logits = (hidden @ weight.T + bias) * logit_scale / temperature``, never materialized
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
        impl: ``"triton"`` (fused kernels), ``"torch"`` (vocab-chunked, O(N) memory) or
            ``"naive"`` (materialized logits, the reference). Default: triton on CUDA, torch otherwise.

    Returns:
        ``logp [...]`` float32 (float64 for float64 inputs), and ``entropy [...]`` when
        ``return_entropy``. Both are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    li = prepare_linear(hidden, weight, targets, bias, temperature, logit_scale, ignore_index, impl)
    logp, ent = logprobs_2d(li, ignore_index, return_entropy)
    logp = logp.reshape(li.shape)
    if return_entropy:
        return logp, ent.reshape(li.shape)
    return logp
