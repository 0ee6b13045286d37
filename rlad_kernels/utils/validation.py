"""Input guards for the public ops.

Validation happens once, at the public boundary. Every error names the argument, what was
received and how to fix it. Checks that would need a device-to-host sync on CUDA (the range
of ``targets``) are issued with ``torch._assert_async`` there, so the hot path never waits on
the GPU; on CPU they raise immediately. ``normalizer=`` is checked where it is converted, in
``ops/common/normalizer.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

IMPLS = ("triton", "torch", "naive")


def check_float_param(name: str, value, *, positive: bool = False, allow_none: bool = False,
                      low: float | None = None, high: float | None = None,
                      low_open: bool = False, high_open: bool = False) -> None:
    """A finite Python number, optionally bounded. Raises ValueError/TypeError naming ``name``."""
    if value is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python int or float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        op = "<" if high_open else "<="
        raise ValueError(f"{name} must be {op} {high}, got {value}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(repr(c) for c in choices)}")


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        *, hidden_name: str = "hidden", weight_name: str = "weight",
                        bias_name: str = "bias") -> None:
    """hidden [..., H], weight [V, H], bias [V] on one device, floating point."""
    for name, t in ((hidden_name, hidden), (weight_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must have shape [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} has hidden size {weight.shape[1]} but {hidden_name} has {hidden.shape[-1]}: "
            f"{weight_name} must be the lm_head weight of shape [V, H] with H = {hidden_name}.shape[-1]"
            + (" (did you pass weight.T?)" if weight.shape[0] == hidden.shape[-1] else ""))
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} has an empty vocabulary (shape {tuple(weight.shape)})")
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but {hidden_name} is on {hidden.device}; "
                         f"move both to the same device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"{bias_name} must be a floating-point tensor or None")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"{bias_name} is on {bias.device} but {hidden_name} is on {hidden.device}")
    if weight.dtype != hidden.dtype and not _autocast_on(hidden.device):
        raise TypeError(
            f"{hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}; cast one of them "
            f"(e.g. weight.to({hidden.dtype})) or run under torch.autocast")


def _autocast_on(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def check_targets(targets, shape: torch.Size, vocab: int, ignore_index: int, device: torch.device,
                  *, shape_name: str = "hidden.shape[:-1]") -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (torch.long), got {targets.dtype}; "
                        f"use targets.long()")
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)} but {shape_name} is {tuple(shape)}; "
                         f"they must match (one target id per hidden state)")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    msg = (f"targets has ids outside [0, {vocab}) that are not ignore_index={ignore_index}; "
           f"mask them with ignore_index or check the tokenizer/vocabulary size")
    if targets.device.type == "cpu":
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(msg + f" (first bad id: {first})")
    else:  # no host sync on accelerators: a device-side assert
        torch._assert_async(~bad.any(), msg)


def check_token_tensor(name: str, t, shape: torch.Size, device: torch.device, *,
                       required: bool = False, no_grad: bool = True) -> None:
    """Per-token float inputs (advantages, old_logp, ...): same shape as targets, no grad."""
    if t is None:
        if required:
            raise TypeError(f"{name} is required")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but targets has shape {tuple(shape)}; "
                         f"pass one value per token")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if no_grad and t.requires_grad:
        raise ValueError(f"{name} requires grad, but it is a constant of the loss (no gradient flows "
                         f"into it); pass {name}.detach()")


def check_teacher(teacher_hidden, teacher_weight, teacher_bias, student_shape, V: int, device: torch.device) -> None:
    """The teacher's final hidden states ``[..., H_t]`` for the student's tokens and its lm_head
    ``[V_t, H_t]`` with ``V_t >= V``, frozen, on the student's device."""
    check_linear_inputs(teacher_hidden, teacher_weight, teacher_bias, hidden_name="teacher_hidden",
                        weight_name="teacher_weight", bias_name="teacher_bias")
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_shape):
        raise ValueError(f"teacher_hidden has token shape {tuple(teacher_hidden.shape[:-1])} but student_hidden has "
                         f"{tuple(student_shape)}; both must hold the same tokens")
    if teacher_weight.shape[0] < V:
        raise ValueError(f"teacher vocabulary ({teacher_weight.shape[0]}) is smaller than the student's ({V}); "
                         f"teacher and student must share a tokenizer (a padded, larger teacher vocabulary is fine)")
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad, but the teacher is frozen (no gradient flows into it); "
                             f"pass {name}.detach() or compute it under torch.no_grad()")
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but the student's hidden states are on "
                         f"{device}")
