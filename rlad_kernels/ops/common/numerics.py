"""Numerical conventions shared by every op."""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and gradients are formed in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_weights(a: float) -> tuple[float, float]:
    """``(log a, log(1 - a))`` of a mixture weight ``a`` in [0, 1], with ``log 0 = -inf``: the
    weights of TRRD's arithmetic anchor and of the generalized JSD's mixture ``M``."""
    return (math.log(a) if a > 0 else -math.inf, math.log1p(-a) if a < 1 else -math.inf)
