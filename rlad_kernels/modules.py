"""Thin ``nn.Module`` wrappers: they store the call's settings and call the functional ops.

Settings (temperature, ``impl``, the loss config ...) go to the constructor; tensors and heads go
to ``forward``. A head is an ``LMHead``, so a model's logit scale and soft cap travel with its
weight; the constructor keywords ``logit_scale`` / ``softcap`` / ``teacher_softcap`` /
``teacher_logit_scale`` of earlier releases still apply, with a ``DeprecationWarning``, to heads
given as bare weight tensors.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .losses import PolicyLossOutput, linear_policy_loss
from .ops.common.head import LMHead
from .ops.divergence.api import linear_divergence
from .ops.logprobs.api import linear_logprobs
from .ops.policy_loss.config import PolicyLossConfig
from .ops.policy_loss.math import TokenInputs
from .utils.validation import check_float_param


def _old_head_settings(module: str, given: dict) -> dict:
    """The head settings an earlier release took in the constructor (only those set), with a
    DeprecationWarning: they now belong in the ``LMHead`` given to ``forward``."""
    given = {k: v for k, v in given.items() if v is not None and not (k.endswith("logit_scale") and v == 1.0)}
    for name, value in given.items():
        check_float_param(name, value, positive=True)
    if given:
        warnings.warn(f"{module}({', '.join(f'{k}=...' for k in given)}) is deprecated and will be removed in the "
                      f"next release: put them in the LMHead given to forward (LMHead(weight, bias, logit_scale, "
                      f"softcap))", DeprecationWarning, stacklevel=3)
    return given


def _head_keywords(module: str, head, settings: dict, prefix: str = "") -> dict:
    """The old head settings of one model (the student's, or with ``prefix="teacher_"`` the
    teacher's) as the op's keywords for a head given as a bare tensor. With an ``LMHead`` they
    would be ignored silently, so that is an error."""
    mine = {k: v for k, v in settings.items() if k.startswith("teacher_") == bool(prefix)}
    if mine and isinstance(head, LMHead):
        raise TypeError(f"{module} was built with {', '.join(mine)} but forward got an LMHead: put them in the "
                        f"LMHead and build the module without them")
    return mine


class LinearLogprobs(nn.Module):
    """``LinearLogprobs(temperature=1.0, ...)(hidden, head, targets)`` -> logp (and entropy);
    see :func:`rlad_kernels.linear_logprobs`."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 impl: str | None = None, logit_scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        check_float_param("temperature", temperature, positive=True)
        self.temperature, self.ignore_index, self.return_entropy, self.impl = (
            temperature, ignore_index, return_entropy, impl)
        self.old_head = _old_head_settings("LinearLogprobs", {"logit_scale": logit_scale, "softcap": softcap})

    def forward(self, hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, **legacy):
        legacy.update(_head_keywords("LinearLogprobs", head, self.old_head))
        return linear_logprobs(hidden, head, targets, temperature=self.temperature, ignore_index=self.ignore_index,
                               return_entropy=self.return_entropy, impl=self.impl, **legacy)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, impl={self.impl}")


class LinearPolicyLoss(nn.Module):
    """``LinearPolicyLoss(config)(hidden, head, targets, inputs, teacher_hidden=..., ...)``; see
    :func:`rlad_kernels.linear_policy_loss`.

    The module stores the settings (``config``, ``temperature``, ``ignore_index``, ``impl``);
    ``forward`` takes the tensors: the hidden states, the head, the targets, the ``TokenInputs``
    and every other tensor keyword of ``linear_policy_loss`` (``teacher_hidden``,
    ``teacher_head``, ``normalizer``, ``entropy_normalizer``), passed through unchanged."""

    SETTINGS = ("config", "temperature", "ignore_index", "impl", "logit_scale", "softcap", "teacher_softcap",
                "teacher_logit_scale")

    def __init__(self, config: PolicyLossConfig | None = None, *, temperature: float = 1.0, ignore_index: int = -100,
                 impl: str | None = None, logit_scale: float = 1.0, softcap: float | None = None,
                 teacher_softcap: float | None = None, teacher_logit_scale: float = 1.0):
        super().__init__()
        check_float_param("temperature", temperature, positive=True)
        self.config = config if config is not None else PolicyLossConfig()
        self.temperature, self.ignore_index, self.impl = temperature, ignore_index, impl
        self.old_head = _old_head_settings("LinearPolicyLoss", {
            "logit_scale": logit_scale, "softcap": softcap, "teacher_softcap": teacher_softcap,
            "teacher_logit_scale": teacher_logit_scale})

    def forward(self, hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, inputs: TokenInputs | None = None,
                *legacy_args, **tensors) -> PolicyLossOutput:
        settings = sorted(set(tensors) & set(self.SETTINGS))
        if settings:
            raise TypeError(f"{settings} are settings of the module; pass them to LinearPolicyLoss(...), "
                            f"not to forward")
        tensors.update(_head_keywords("LinearPolicyLoss", head, self.old_head))
        teacher = tensors.get("teacher_head", tensors.get("teacher_weight"))
        if teacher is not None:
            tensors.update(_head_keywords("LinearPolicyLoss", teacher, self.old_head, prefix="teacher_"))
        return linear_policy_loss(hidden, head, targets, inputs, *legacy_args, temperature=self.temperature,
                                  ignore_index=self.ignore_index, config=self.config, impl=self.impl, **tensors)

    def extra_repr(self) -> str:
        return f"{self.config}, temperature={self.temperature}, impl={self.impl}"


class LinearDivergence(nn.Module):
    """``LinearDivergence(kind="reverse_kl", ...)(student_hidden, student_head, teacher_hidden,
    teacher_head, mask=None, token_weights=None, normalizer=None)``; see
    :func:`rlad_kernels.linear_divergence`. The settings (``kind``, ``beta``, ``temperature``,
    ``reduction``, ``impl``) are the module's; the tensors and heads go to ``forward``."""

    def __init__(self, kind: str = "reverse_kl", *, beta: float = 0.5, temperature: float = 1.0,
                 reduction: str = "mean", impl: str | None = None):
        super().__init__()
        from .ops.divergence.api import REDUCTIONS
        from .ops.divergence.kinds import KINDS
        from .utils.validation import check_choice

        check_choice("kind", kind, KINDS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_float_param("beta", beta, low=0.0, high=1.0)
        check_float_param("temperature", temperature, positive=True)
        self.kind, self.beta, self.temperature, self.reduction, self.impl = kind, beta, temperature, reduction, impl

    def forward(self, student_hidden: torch.Tensor, student_head: LMHead, teacher_hidden: torch.Tensor,
                teacher_head: LMHead, *, mask: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
        return linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind=self.kind,
                                 beta=self.beta, temperature=self.temperature, mask=mask, token_weights=token_weights,
                                 normalizer=normalizer, reduction=self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, impl={self.impl}")
