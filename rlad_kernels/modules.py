"""Thin ``nn.Module`` wrappers: they store settings and call the functional ops."""

from __future__ import annotations

import torch
from torch import nn

from .ops.logprobs.api import linear_logprobs
from .ops.policy_loss.api import PolicyLossOutput, linear_policy_loss
from .ops.policy_loss.config import PolicyLossConfig
from .utils.validation import check_float_param


class LinearLogprobs(nn.Module):
    """``LinearLogprobs(temperature=1.0, ...)(hidden, weight, targets, bias=None)`` -> logp
    (and entropy); see :func:`rlad_kernels.linear_logprobs`."""

    def __init__(self, *, temperature: float = 1.0, logit_scale: float = 1.0, ignore_index: int = -100,
                 return_entropy: bool = False, softcap: float | None = None, impl: str | None = None):
        super().__init__()
        check_float_param("temperature", temperature, positive=True)
        check_float_param("logit_scale", logit_scale, positive=True)
        check_float_param("softcap", softcap, positive=True, allow_none=True)
        self.temperature, self.logit_scale, self.ignore_index = temperature, logit_scale, ignore_index
        self.return_entropy, self.softcap, self.impl = return_entropy, softcap, impl

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None):
        return linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                               logit_scale=self.logit_scale, ignore_index=self.ignore_index,
                               return_entropy=self.return_entropy, softcap=self.softcap, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, logit_scale={self.logit_scale}, "
                f"ignore_index={self.ignore_index}, return_entropy={self.return_entropy}, softcap={self.softcap}, "
                f"impl={self.impl}")


class LinearPolicyLoss(nn.Module):
    """``LinearPolicyLoss(config)(hidden, weight, targets, advantages, old_logp, **inputs)``;
    see :func:`rlad_kernels.linear_policy_loss`.

    The module stores the settings (``config``, ``temperature``, ``logit_scale``,
    ``ignore_index``, ``softcap``, ``teacher_softcap``, ``teacher_logit_scale``, ``impl``); ``forward``
    takes the tensors: every keyword argument of
    ``linear_policy_loss`` that is not a setting (``teacher_logp``, ``ref_logp``,
    ``token_weights``, ``kd_weights``, ``normalizer``, ``entropy_normalizer``, ``bias``,
    ``teacher_hidden``, ``teacher_weight``, ``teacher_bias``) passes through unchanged."""

    SETTINGS = ("config", "temperature", "logit_scale", "ignore_index", "softcap", "teacher_softcap",
                "teacher_logit_scale", "impl")

    def __init__(self, config: PolicyLossConfig | None = None, *, temperature: float = 1.0,
                 logit_scale: float = 1.0, ignore_index: int = -100, softcap: float | None = None,
                 teacher_softcap: float | None = None, teacher_logit_scale: float = 1.0, impl: str | None = None):
        super().__init__()
        check_float_param("temperature", temperature, positive=True)
        check_float_param("logit_scale", logit_scale, positive=True)
        check_float_param("softcap", softcap, positive=True, allow_none=True)
        check_float_param("teacher_softcap", teacher_softcap, positive=True, allow_none=True)
        check_float_param("teacher_logit_scale", teacher_logit_scale, positive=True)
        self.config = config if config is not None else PolicyLossConfig()
        self.temperature, self.logit_scale, self.ignore_index, self.impl = (
            temperature, logit_scale, ignore_index, impl)
        self.softcap, self.teacher_softcap, self.teacher_logit_scale = softcap, teacher_softcap, teacher_logit_scale

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                old_logp: torch.Tensor, **inputs) -> PolicyLossOutput:
        settings = sorted(set(inputs) & set(self.SETTINGS))
        if settings:
            raise TypeError(f"{settings} are settings of the module; pass them to LinearPolicyLoss(...), "
                            f"not to forward")
        return linear_policy_loss(hidden, weight, targets, advantages, old_logp, temperature=self.temperature,
                                  logit_scale=self.logit_scale, ignore_index=self.ignore_index, config=self.config,
                                  softcap=self.softcap, teacher_softcap=self.teacher_softcap,
                                  teacher_logit_scale=self.teacher_logit_scale, impl=self.impl, **inputs)

    def extra_repr(self) -> str:
        return f"{self.config}, temperature={self.temperature}, impl={self.impl}"
