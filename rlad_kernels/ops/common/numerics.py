"""Numerical conventions shared by every op."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and gradients are formed in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_weights(a: float) -> tuple[float, float]:
    """``(log a, log(1 - a))`` of a mixture weight ``a`` in [0, 1], with ``log 0 = -inf``: the
    weights of TRRD's arithmetic anchor and of the generalized JSD's mixture ``M``."""
    return (math.log(a) if a > 0 else -math.inf, math.log1p(-a) if a < 1 else -math.inf)


class LogitMap(NamedTuple):
    """How the raw lm_head output ``r = x W^T + b`` becomes the logits the softmax sees:
    ``z = r * scale``, or with a soft cap ``c`` (Gemma 2's ``final_logit_softcapping``)
    ``z = c tanh(r * logit_scale / c) / T = cap_out * tanh(r * cap_in)``. The cap applies to the
    model's logits, before the sampler's temperature; ``scale = logit_scale / T`` either way,
    and ``dz/dr = scale * (1 - tanh^2)`` with the cap, ``scale`` without."""

    scale: float
    cap_in: float = 0.0   # logit_scale / c; 0 without a cap
    cap_out: float = 0.0  # c / T

    @staticmethod
    def of(logit_scale: float = 1.0, temperature: float = 1.0, softcap: float | None = None) -> LogitMap:
        scale = float(logit_scale) / float(temperature)
        if softcap is None:
            return LogitMap(scale)
        return LogitMap(scale, float(logit_scale) / float(softcap), float(softcap) / float(temperature))

    @property
    def capped(self) -> bool:
        return self.cap_in != 0.0

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        """The logits of raw outputs ``r`` (a new tensor)."""
        return torch.tanh(r * self.cap_in) * self.cap_out if self.capped else r * self.scale

    def slope(self, z: torch.Tensor) -> torch.Tensor:
        """``dz/dr`` elementwise, from the logits ``z`` (capped maps only)."""
        t = z / self.cap_out
        return (1.0 - t * t) * self.scale
