"""``TrainConfig``: every setting of a run, with help text and validation.

Sources, later ones winning: the defaults below, a YAML file (``--config run.yaml``), then
command-line flags (``--lr 1e-4``; the flag of a field is its name with ``-`` for ``_``).
Invalid settings fail at start with a message naming the field and the fix.

Groups: run (output, seed, device), models, task, rollout, algorithm, optimization,
evaluation, checkpointing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ALGOS = ("rlad", "grpo", "kdrl", "opd", "sft")
TEACHER_ALGOS = ("rlad", "kdrl", "opd", "sft")
AGGREGATIONS = ("token_mean", "seq_mean", "constant")
KD_ESTIMATORS = ("k1", "k2", "k3", "full")
OPD_KINDS = ("jsd", "reverse_kl", "sampled")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16")


def _f(default, help: str, group: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group, **kw})
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    # run
    out_dir: str = _f("runs/rlad", "output folder: metrics.jsonl, plots, summary, checkpoints", "run")
    seed: int = _f(0, "seed of data, sampling and initialization", "run")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)", "run")
    dtype: str = _f("auto", "parameter dtype: float32, or bfloat16 autocast on GPU (auto)", "run")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)", "run")
    quiet: bool = _f(False, "no progress bars (log lines only)", "run")

    # models
    student: str = _f("preset:tiny-student", "student: path, hub id, config:<json> or preset:<name>", "models")
    teacher: Optional[str] = _f(None, "teacher (rlad, kdrl, opd, sft): path, hub id, config:<json> or preset:<name>",
                                "models")
    ref: Optional[str] = _f(None, "reference model for ref_kl_coef (default: a frozen copy of the initial student)",
                            "models")
    tokenizer: Optional[str] = _f(None, "tokenizer path or hub id (default: the student's if it is a path or hub "
                                        "id, else the built-in tokenizer)", "models")
    prompt_template: str = _f("{prompt}\n", "how a prompt is shown to the model; must contain {prompt}", "models")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward (GPU memory)", "models")

    # task
    task: str = _f("arithmetic", "knights, arithmetic, echo, or jsonl:<path>", "task")
    levels: List[int] = _f([], "difficulty levels to train on (default: all of the task's)", "task")
    reward: str = _f("exact", "for jsonl tasks: exact, numeric, contains or module:function", "task")

    # rollout
    steps: int = _f(50, "RL steps (one rollout batch each)", "rollout")
    prompts_per_step: int = _f(16, "prompts per rollout batch", "rollout")
    group_size: int = _f(8, "G: responses sampled per prompt (>= 2)", "rollout")
    temperature: float = _f(1.0, "sampling temperature; log-probs use the same", "rollout")
    top_p: float = _f(1.0, "nucleus sampling", "rollout")
    max_new_tokens: int = _f(32, "longest response", "rollout")

    # algorithm
    algo: str = _f("rlad", "rlad (TRRD), grpo, kdrl, opd (on-policy distillation) or sft (offline distillation)",
                   "algorithm")
    alpha: float = _f(0.5, "TRRD: weight of the old policy in the anchor pi_old^a pi_T^(1-a)", "algorithm")
    eps_low: float = _f(0.2, "clip range low: ratio >= 1 - eps_low", "algorithm")
    eps_high: float = _f(0.2, "clip range high: ratio <= 1 + eps_high", "algorithm")
    teacher_clamp: Optional[float] = _f(1.0, "TRRD: clamp |lp - lp_teacher| (None: off)", "algorithm")
    dual_clip: Optional[float] = _f(None, "dual clip constant (> 1) for A < 0 tokens (None: off)", "algorithm")
    mixture: str = _f("geometric", "TRRD anchor: geometric (RLAD) or arithmetic", "algorithm")
    adv_std_norm: bool = _f(True, "divide group advantages by their std (False: Dr. GRPO)", "algorithm")
    aggregation: str = _f("token_mean", "token_mean (global over the batch), seq_mean, or constant", "algorithm")
    ref_kl_coef: float = _f(0.0, "weight of the k3 KL to the reference model", "algorithm")
    entropy_coef: float = _f(0.0, "entropy bonus weight", "algorithm")
    kd_estimator: str = _f("k2", "kdrl: k1, k2, k3 (sampled token) or full (exact reverse KL)", "algorithm")
    kd_beta: float = _f(5e-3, "kdrl: initial KD coefficient", "algorithm")
    kd_beta_min: float = _f(1e-3, "kdrl: floor of the linearly annealed KD coefficient", "algorithm")
    kd_beta_decay: float = _f(5e-5, "kdrl: KD coefficient decrease per step", "algorithm")
    kd_reward_mask: bool = _f(True, "kdrl: no KD on responses whose reward is 1 (reward-guided KD)", "algorithm")
    opd_kind: str = _f("jsd", "opd: jsd or reverse_kl (full vocabulary), or sampled (-(lp - lp_T) advantage)",
                       "algorithm")
    opd_beta: float = _f(0.5, "opd: JSD beta (0 forward KL, 1 reverse KL)", "algorithm")
    sft_prompts: int = _f(256, "sft: prompts the teacher solves to build the offline dataset", "algorithm")

    # optimization
    lr: float = _f(1e-4, "AdamW learning rate", "optimization")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optimization")
    betas: List[float] = _f([0.9, 0.999], "AdamW betas", "optimization")
    schedule: str = _f("constant", "learning-rate schedule after warmup: constant, linear or cosine", "optimization")
    warmup_steps: int = _f(0, "linear warmup, in optimizer steps", "optimization")
    grad_clip: float = _f(1.0, "max global gradient norm (0: off)", "optimization")
    ppo_epochs: int = _f(1, "passes over each rollout batch", "optimization")
    mini_batches: int = _f(2, "optimizer steps per pass (the batch is split into this many)", "optimization")
    micro_batch_size: int = _f(64, "sequences per forward/backward (gradient accumulation)", "optimization")

    # evaluation
    eval_every: int = _f(10, "evaluate every N steps (0: only at the end)", "evaluation")
    eval_prompts: int = _f(128, "held-out prompts per evaluation", "evaluation")
    eval_samples: int = _f(0, "samples per prompt for mean@k / pass@k (0: greedy accuracy only)", "evaluation")

    # checkpointing
    save_every: int = _f(10, "checkpoint every N steps (0: only at the end)", "checkpointing")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", "checkpointing")
    resume: bool = _f(False, "continue from the latest complete checkpoint in out_dir", "checkpointing")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name, msg):
            raise ValueError(f"config: {name}={getattr(self, name)!r}: {msg}")

        if self.algo not in ALGOS:
            bad("algo", f"unknown algorithm; choose one of {', '.join(ALGOS)}")
        if self.algo in TEACHER_ALGOS and not self.teacher:
            bad("teacher", f"algo={self.algo!r} needs a teacher; set teacher=<path|hub id|preset:...> or use algo=grpo")
        if self.group_size < 2 and self.algo != "sft":
            bad("group_size", "group advantages need at least 2 responses per prompt; set group_size >= 2")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "ppo_epochs", "mini_batches",
                     "micro_batch_size", "eval_prompts", "sft_prompts", "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("eval_every", "save_every", "warmup_steps", "eval_samples", "threads"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("temperature", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, "must be a positive number")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.alpha <= 1:
            bad("alpha", "the TRRD mixture weight must be in [0, 1] (1 = GRPO, 0 = fully teacher-anchored)")
        if not 0 <= self.eps_low < 1:
            bad("eps_low", "must be in [0, 1)")
        if self.eps_high < 0:
            bad("eps_high", "must be >= 0")
        if self.teacher_clamp is not None and self.teacher_clamp <= 0:
            bad("teacher_clamp", "must be > 0, or None to disable the clamp")
        if self.dual_clip is not None and self.dual_clip <= 1:
            bad("dual_clip", "must be > 1, or None to disable")
        if self.mixture not in ("geometric", "arithmetic"):
            bad("mixture", "choose geometric or arithmetic")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"choose one of {', '.join(AGGREGATIONS)}")
        if self.kd_estimator not in KD_ESTIMATORS:
            bad("kd_estimator", f"choose one of {', '.join(KD_ESTIMATORS)}")
        if self.opd_kind not in OPD_KINDS:
            bad("opd_kind", f"choose one of {', '.join(OPD_KINDS)}")
        if not 0 <= self.opd_beta <= 1:
            bad("opd_beta", "must be in [0, 1]")
        if self.kd_beta < 0 or self.kd_beta_min < 0 or self.kd_beta_decay < 0:
            bad("kd_beta", "kd_beta, kd_beta_min and kd_beta_decay must be >= 0")
        if self.ref_kl_coef < 0:
            bad("ref_kl_coef", "must be >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose one of {', '.join(DTYPES)}")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 disables clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "two numbers in [0, 1)")
        if "{prompt}" not in self.prompt_template:
            bad("prompt_template", "must contain {prompt}")
        batch = self.prompts_per_step * (1 if self.algo == "sft" else self.group_size)
        if self.mini_batches > batch:
            bad("mini_batches", f"cannot split a batch of {batch} sequences into {self.mini_batches} mini-batches")
        if self.task.startswith("jsonl:") and not Path(self.task[len("jsonl:"):]).is_file():
            bad("task", "JSONL file not found")

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; run `rlad train --help` for the list")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, overrides: Optional[Dict[str, Any]] = None) -> "TrainConfig":
        import yaml

        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _parse_optional(cast):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else cast(s)
    return parse


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_config_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per TrainConfig field, grouped; an absent flag leaves no attribute (SUPPRESS), so
    only given flags override, including an explicit ``none``."""
    groups = {}
    hints = {"int": int, "float": float, "str": str, "bool": _parse_bool,
             "Optional[str]": _parse_optional(str), "Optional[float]": _parse_optional(float)}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata['help']} (default: {default})"
        if t.startswith("List["):
            cast = int if "int" in t else float
            groups[g].add_argument(flag, type=cast, nargs="+", default=argparse.SUPPRESS, help=help_, dest=f.name)
        else:
            groups[g].add_argument(flag, type=hints[t], default=argparse.SUPPRESS, help=help_, dest=f.name,
                                   metavar=t.replace("Optional[", "").rstrip("]").upper())


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    given = vars(args)
    overrides = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
    values = dict(base or {})
    values.update(overrides)
    if getattr(args, "config", None):
        return TrainConfig.from_yaml(args.config, values)
    return TrainConfig.from_dict(values, source="command line")
