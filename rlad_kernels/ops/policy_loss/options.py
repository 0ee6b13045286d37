"""The policy loss's options, defined once: their names, types, defaults and help text.

``PolicyLossConfig`` (the op's configuration, validated there), ``rlad``'s ``TrainConfig`` (the
``rlad train`` flags and YAML keys) and ``RLADConfig`` (the TRL integration: the teacher options
only, TRL names its own clip and KL settings) all take their fields from here, so an option's
meaning is written in one place. This module imports nothing but the standard library: reading
the trainer's flags never waits for torch or Triton. The math is in ``PolicyLossConfig``'s
docstring and ``ops/policy_loss/README.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MIXTURES = ("geometric", "arithmetic")
CLAMP_GRADS = ("zero", "straight_through")
KD_ESTIMATORS = (None, "k1", "k2", "k3", "full")
RATIO_LEVELS = ("token", "sequence")
OBJECTIVES = ("clip", "cispo")


def _option(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TeacherOptions:
    """How the teacher enters the ratio (TRRD, RLAD's core)."""

    alpha: float = _option(0.5, "TRRD: weight of the old policy in the anchor pi_old^a pi_T^(1-a), in [0, 1] (1: "
                                "GRPO, 0: fully teacher-anchored)")
    teacher_clamp: float | None = _option(1.0, "TRRD: clamp |lp - lp_teacher| to this bound c > 0 in the geometric "
                                               "ratio (None: off)")
    teacher_clamp_grad: str = _option("zero", "TRRD: derivative where the clamp is active: zero (the clamped term "
                                              "passes none: d log r / d lp = alpha) or straight_through (1, as if "
                                              "unclamped; an ablation)", choices=list(CLAMP_GRADS))
    teacher_align_threshold: float | None = _option(None, "gated TRRD (off: None): tokens with |lp_old - lp_teacher| "
                                                          "above it (> 0) take the GRPO ratio (the teacher term is "
                                                          "dropped), as in the RLAD summary's selective imitation")
    teacher_adv_threshold: float | None = _option(None, "gated TRRD (off: None): tokens with |A| below it (>= 0) take "
                                                        "the GRPO ratio")
    mixture: str = _option("geometric", "TRRD anchor: geometric (RLAD) or arithmetic (log r = lp - log(alpha pi_old "
                                        "+ (1 - alpha) pi_T); the clamp does not apply)", choices=list(MIXTURES))


@dataclass
class PolicyOptions(TeacherOptions):
    """The teacher options, and the clip, KD, reference-KL and entropy options of the loss."""

    eps_low: float = _option(0.2, "clip range low: ratio >= 1 - eps_low (0 <= eps_low < 1)")
    eps_high: float = _option(0.2, "clip range high: ratio <= 1 + eps_high (>= 0)")
    dual_clip: float | None = _option(None, "dual-clip constant (> 1) bounding the loss of A < 0 tokens (None: off)")
    kd_estimator: str | None = _option(None, "KDRL's KD term: k1, k2, k3 (sampled-token estimators of KL(student || "
                                             "teacher)) or full (the exact reverse KL over the vocabulary, from the "
                                             "teacher's hidden states and head); None (the op's default): no KD term")
    ref_kl_coef: float = _option(0.0, "weight of the k3 KL to the reference model (>= 0)")
    entropy_coef: float = _option(0.0, "entropy bonus weight (the loss subtracts entropy_coef x entropy)")
    ratio_level: str = _option("token", "token (PPO / GRPO / TRRD ratio per token) or sequence (GSPO: one ratio per "
                                        "response, the exp of its tokens' mean log-ratio; with TRRD, the token "
                                        "log-ratios are averaged)", choices=list(RATIO_LEVELS))
    objective: str = _option("clip", "clip (the PPO clipped surrogate) or cispo (MiniMax-M1's CISPO: "
                                     "-sg(min(r, cispo_max)) A lp; eps_low / eps_high unused, dual_clip must be None)",
                             choices=list(OBJECTIVES))
    cispo_max: float = _option(5.0, "cispo: the cap on the importance weight, an absolute bound on the ratio (> 0), "
                                    "not an offset from 1")


POLICY_OPTIONS = tuple(f.name for f in dataclasses.fields(PolicyOptions))
TEACHER_OPTIONS = tuple(f.name for f in dataclasses.fields(TeacherOptions))


def option(name: str, **changes):
    """A field for the option ``name`` with the shared help and a different ``default`` (a
    trainer whose algorithm sets an option by default), or other metadata."""
    source = next(f for f in dataclasses.fields(PolicyOptions) if f.name == name)
    default = changes.pop("default", source.default)
    return field(default=default, metadata={**source.metadata, **changes})
