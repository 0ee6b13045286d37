"""Reference per-token log-probs: materializes the full ``[N, V]`` logits. The test oracle.

Works in float64 when the inputs are float64; otherwise computes in float32. Gradients come
from autograd. Use it to check the other implementations, never for large N x V.
"""

from __future__ import annotations

import torch

from ..common.numerics import compute_dtype


def linear_logprobs_naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          logit_scale: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, softcap: float | None = None):
    """``hidden [..., H]``, ``weight [V, H]``, ``targets [...]`` -> ``logp [...]`` (+ ``entropy [...]``).

    ``logits = (hidden @ weight.T + bias) * logit_scale / temperature``, or with a soft cap ``c``
    ``c * tanh((hidden @ weight.T + bias) * logit_scale / c) / temperature``; ignored positions give 0.
    """
    cdt = compute_dtype(hidden.dtype)
    valid = targets != ignore_index
    # ignored rows never enter the product: whatever they hold (NaN padding) cannot reach dW
    hidden = torch.where(valid[..., None], hidden.to(cdt), torch.zeros((), dtype=cdt, device=hidden.device))
    logits = hidden @ weight.to(cdt).T
    if bias is not None:
        logits = logits + bias.to(cdt)
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    ent = -torch.where(p == 0, torch.zeros_like(p), p * logp_all).sum(-1)
    ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent
