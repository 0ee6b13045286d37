"""``LMHead``: the lm_head as every fused op takes it, for the student and the teacher alike.

``logits = (hidden @ weight.T + bias) * logit_scale / temperature``, or with a soft cap ``c``
``c * tanh((hidden @ weight.T + bias) * logit_scale / c) / temperature``. The temperature is the
sampler's, a setting of the call; the rest belongs to the model, so it travels with its weight.

The keyword form of earlier releases (``weight`` as a tensor plus ``bias=``, ``logit_scale=``,
``softcap=``, and ``teacher_weight=`` / ``student_bias=`` ... for the second model) still works
for one release, with a ``DeprecationWarning``: ``legacy_head`` turns it into an ``LMHead``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

HEAD_FIELDS = ("bias", "logit_scale", "softcap")


@dataclass(frozen=True)
class LMHead:
    """An lm_head: ``weight [V, H]``, optional ``bias [V]``, the model's logit multiplier
    ``logit_scale`` (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``) and final-logit
    soft cap ``softcap`` (Gemma 2/3's ``final_logit_softcapping``), or None. The ops check the
    values (and name them) when they are called; ``LMHead.of(model)`` reads a ``transformers``
    model's."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model) -> LMHead:
        """The head of a ``transformers`` causal LM: ``get_output_embeddings()``'s weight and bias,
        and the logit map its config declares (plain models: scale 1, no cap)."""
        out = model.get_output_embeddings()
        if out is None or not isinstance(getattr(out, "weight", None), torch.Tensor):
            raise ValueError(f"{type(model).__name__} has no output embedding (lm_head); the fused ops need a "
                             f"causal LM's lm_head")
        cfg = model.config
        scale = float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)
        cap = getattr(cfg, "final_logit_softcapping", None)
        return cls(out.weight, getattr(out, "bias", None), scale, float(cap) if cap else None)

    def detach(self) -> LMHead:
        """The same head with its tensors detached (a frozen teacher's)."""
        return LMHead(self.weight.detach(), self.bias.detach() if self.bias is not None else None, self.logit_scale,
                      self.softcap)


def legacy_head(op: str, head, legacy: dict, *, prefix: str = "", role: str = "head",
                stacklevel: int = 3) -> LMHead | None:
    """``head`` as an ``LMHead``. A tensor is the keyword form of earlier releases: its ``bias``,
    ``logit_scale`` and ``softcap`` are popped from ``legacy`` (as ``prefix + name``) with a
    ``DeprecationWarning`` attributed to the op's caller (``stacklevel`` counts from here: 3 when
    the op calls this directly). None stays None (no such model). Keywords of the old form beside
    an ``LMHead`` are a TypeError: they belong in the head."""
    keys = [prefix + name for name in HEAD_FIELDS]
    if isinstance(head, LMHead) or head is None:
        given = [k for k in keys if k in legacy]
        if given:
            raise TypeError(f"{op}: {', '.join(given)} belong in the LMHead ({role}=LMHead(weight, "
                            f"{', '.join(f'{k[len(prefix):]}=...' for k in given)})), not beside it")
        return head
    if not isinstance(head, torch.Tensor):
        raise TypeError(f"{op}: {role} must be an LMHead (rlad_kernels.LMHead(weight, bias=None, logit_scale=1.0, "
                        f"softcap=None)), got {type(head).__name__}")
    warnings.warn(f"{op}: passing the lm_head weight as a tensor (with {', '.join(keys)} as keywords) is deprecated "
                  f"and will be removed in the next release; pass {role}=LMHead(weight, bias=..., logit_scale=..., "
                  f"softcap=...)", DeprecationWarning, stacklevel=stacklevel)
    found = {name: legacy.pop(prefix + name) for name in HEAD_FIELDS if prefix + name in legacy}
    return LMHead(head, **found)


def reject_unknown(op: str, legacy: dict) -> None:
    """Keywords left over after the old form was read: unknown, as Python would say."""
    if legacy:
        raise TypeError(f"{op}() got unexpected keyword argument(s) {', '.join(map(repr, sorted(legacy)))}")
