"""The normalizer a reduced loss is divided by: the default token mean, and a user's
``normalizer=`` (a number or a scalar tensor) made into a float32 scalar, checked on the CPU
and guarded on the device (no host sync)."""

from __future__ import annotations

import math

import torch

from ...utils.validation import check_float_param


def token_mean_normalizer(weight_sum: torch.Tensor) -> torch.Tensor:
    """The default normalizer: the sum of token weights over valid tokens, or 1 when there are
    none (an all-ignored batch then gives loss 0, not 0 / 0)."""
    return torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


def as_normalizer(normalizer, device: torch.device, name: str = "normalizer") -> torch.Tensor | None:
    """None, a finite number > 0 or a 1-element float tensor -> None or a detached float32 scalar.

    A tensor on the CPU is checked here (ValueError unless finite and > 0). On an accelerator
    checking it would make the host wait for the device, so ``guard_normalizer`` turns a value
    that is not finite and > 0 into NaN there instead: the loss and its gradient are NaN (a
    trainer's non-finite check catches it), never silently flipped in sign or infinite."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or not normalizer.is_floating_point():
            raise ValueError(f"{name} must be a number or a 1-element float tensor, got shape "
                             f"{tuple(normalizer.shape)} dtype {normalizer.dtype}")
        if normalizer.device != device:
            raise ValueError(f"{name} is on {normalizer.device} but hidden is on {device}")
        norm = normalizer.detach().reshape(()).float()
        if norm.device.type != "cpu":
            return guard_normalizer(norm)
        value = float(norm)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got a tensor holding {value}; pass the count "
                             f"(or sum of token weights) the loss is divided by")
        return norm
    check_float_param(name, normalizer, positive=True)
    return torch.tensor(float(normalizer), dtype=torch.float32, device=device)


def guard_normalizer(norm: torch.Tensor) -> torch.Tensor:
    """The device-side check of a normalizer tensor: NaN unless finite and > 0 (no host sync)."""
    return torch.where(torch.isfinite(norm) & (norm > 0), norm, torch.full_like(norm, float("nan")))
