"""Input preparation shared by the public functions: validation, autocast, flattening."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...utils.dispatch import resolve_impl
from ...utils.validation import check_float_param, check_linear_inputs, check_targets
from .head import LMHead
from .numerics import LogitMap


def autocast_cast(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under ``torch.autocast`` the fused ops compute in the autocast dtype, as ``F.linear``
    would: cast every given tensor (``None`` passes through). Outside autocast, unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if t is not None else None for t in tensors)


def rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` -> contiguous ``[N, H]``."""
    return t.reshape(-1, t.shape[-1]).contiguous()


@dataclass
class LinearInputs:
    """Validated, flattened inputs of a fused lm_head op."""

    hidden: torch.Tensor        # [N, H], contiguous
    weight: torch.Tensor        # [V, H]
    bias: torch.Tensor | None   # [V]
    targets: torch.Tensor       # [N] int64
    lmap: LogitMap              # raw output -> logits: logit_scale, soft cap, temperature
    shape: torch.Size           # leading shape of the inputs (targets.shape)
    impl: str
    logit_scale: float = 1.0    # the settings lmap was built from (the naive reference takes them)
    temperature: float = 1.0
    softcap: float | None = None


def prepare_linear(hidden, head: LMHead, targets, temperature, ignore_index, impl, *,
                   names: tuple[str, str] = ("hidden", "")) -> LinearInputs:
    """Validate ``hidden [..., H]``, the head (``weight [V, H]``, ``bias [V]``, its logit map),
    ``targets [...]`` and the temperature, resolve ``impl``, apply autocast and flatten. ``names``:
    how errors call the hidden states and the head's fields (``("hidden", "")`` -> ``weight``, ``bias``;
    ``("student_hidden", "student_")`` -> ``student_weight`` ...)."""
    hidden_name, prefix = names
    check_linear_inputs(hidden, head.weight, head.bias, hidden_name=hidden_name, weight_name=prefix + "weight",
                        bias_name=prefix + "bias")
    check_float_param("temperature", temperature, positive=True)
    check_float_param(prefix + "logit_scale", head.logit_scale, positive=True)
    check_float_param(prefix + "softcap", head.softcap, positive=True, allow_none=True)
    check_targets(targets, hidden.shape[:-1], head.weight.shape[0], ignore_index, hidden.device)
    impl = resolve_impl(impl, hidden.device)
    hidden, weight, bias = autocast_cast(hidden.device.type, hidden, head.weight, head.bias)
    return LinearInputs(
        hidden=rows(hidden),
        weight=weight,
        bias=bias,
        targets=targets.reshape(-1).to(torch.long).contiguous(),
        lmap=LogitMap.of(head.logit_scale, temperature, head.softcap),
        shape=targets.shape,
        impl=impl,
        logit_scale=float(head.logit_scale),
        temperature=float(temperature),
        softcap=float(head.softcap) if head.softcap is not None else None,
    )
