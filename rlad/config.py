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
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlad_kernels.ops.policy_loss.options import KD_ESTIMATORS, POLICY_OPTIONS, PolicyOptions, option

from .algorithms import ALGORITHMS, ALGOS, GROUP, OPD_KINDS, POLICY, ROLLOUTS, Algorithm, find_algorithm
from .prompting import CHAT_MODES

# The policy options (alpha, the clip, the teacher clamp, ...) are rlad_kernels' PolicyOptions,
# inherited: defined and documented once, validated by PolicyLossConfig. Their module imports no
# torch; rlad_kernels proper (torch, Triton) is imported inside the methods that validate or build
# a PolicyLossConfig, so that reading the flags (`rlad train --help`) stays instant.
if TYPE_CHECKING:
    from rlad_kernels import PolicyLossConfig
TEACHER_ALGOS = tuple(dict.fromkeys(a.algo for a in ALGORITHMS if a.needs_teacher))  # for the help text
AGGREGATIONS = ("token_mean", "seq_mean", "constant", "rlad_paper")
KD_VARIANTS = ("recipe", "rlad_paper")
# The clip's upper bound, when eps_high is not set (None): the RLAD paper's (arXiv 2602.22495, Sec. 5.1.1: "GRPO
# clipping thresholds of 0.20 (lower) and 0.28 (upper)", the setting of its K&K runs) for the settings named after
# it, algo=rlad and kdrl's kd_variant=rlad_paper; PPO's / GRPO's symmetric 0.2 (DeepSeekMath) for every other one.
# TrainConfig resolves it when made, so config.json and a resumed run hold the value used.
PAPER_EPS_HIGH = 0.28
EPS_HIGH = 0.2
EPS_HIGH_DEFAULT = (f"{PAPER_EPS_HIGH} with algo=rlad or kdrl's kd_variant=rlad_paper (the RLAD paper's clip, arXiv "
                    f"2602.22495: 0.20 low / 0.28 high), {EPS_HIGH} otherwise; config.json records the value used")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16")
REWARD_ERRORS = ("fail", "zero")
# the most eval prompts per level: the eval set is built, tokenized and checked before the run
# starts, and an accuracy over this many prompts has a standard error of at most 0.005
MAX_EVAL_PROMPTS = 10_000
# seeds are 64-bit signed integers: torch.manual_seed takes [-2**63, 2**64), and the run derives
# others from its seed by adding small constants (seed + 2_000_003: the eval stream)
SEED_RANGE = (-(2**63), 2**63)
# settings that may change when a run is resumed: where and how it runs, not what it computes
# (micro_batch_size, micro_batch_tokens and threads change float rounding only); steps too, with a constant schedule
# a setting that a config.json lacks (written before it existed) had this value, where it is not the field's default
# (eps_high: resolved per algorithm since, 0.2 for every algorithm before; chat_template: prompt_template alone)
SAVED_DEFAULTS = {"eps_high": EPS_HIGH, "chat_template": "off"}
RESUME_SAFE = ("out_dir", "resume", "overwrite", "force_resume", "quiet", "threads", "gradient_checkpointing",
               "micro_batch_size", "micro_batch_tokens", "eval_every", "save_every", "keep_checkpoints",
               "reward_timeout", "reward_errors", "dist_timeout", "diagnostics")
# The sampling temperature's range, for rlad train and rlad eval. Log-probs are
# log_softmax(logits / T) in float32 (the fused ops and the trainer alike; the ops accept any T > 0).
# float32 rounds at 2^-24 ~ 6e-8 relative, so a logit z carries ~|z| * 6e-8 / T nats of rounding
# after the division, and two computations of one token's log-prob (the rollout's old log-prob and
# the loss's new one: other batch shapes, other kernels) differ by that much with unchanged weights.
# Unnormalized LLM logits reach |z| ~ 100: at T = 0.01 that is ~6e-4 nats, far inside the clip range
# (0.2); at T = 1e-4 it is ~0.06, and at T = 1e-30 the ratio is rounding noise (2e8 was logged).
# Below 0.01, sampling is greedy in all but name anyway (a logit gap of 0.1 weighs e^10): evaluate
# greedily instead. Above 100, logits of typical magnitude (< 50) shrink below 0.5: sampling is
# close to uniform over the vocabulary, not the model's policy.
TEMPERATURE_RANGE = (1e-2, 1e2)


def temperature_problem(value) -> str | None:
    """Why ``value`` is not a sampling temperature (outside ``TEMPERATURE_RANGE``), or None."""
    lo, hi = TEMPERATURE_RANGE
    if isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi:
        return None
    return (f"must be in [{lo:g}, {hi:g}] (logits / temperature in float32: below {lo:g}, rounding swamps the "
            f"log-prob ratios and sampling is greedy in all but name; above {hi:g}, sampling is near-uniform)")


def default_eps_high(algo: str, kd_variant: str) -> float:
    """``eps_high`` when it is not set: ``PAPER_EPS_HIGH`` for the RLAD paper's settings, else ``EPS_HIGH``."""
    return PAPER_EPS_HIGH if algo == "rlad" or (algo == "kdrl" and kd_variant == "rlad_paper") else EPS_HIGH


def _f(default, help: str, group: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group, **kw})
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig(PolicyOptions):
    # run
    out_dir: str = _f("runs/rlad", "output folder: metrics.jsonl, plots, summary, checkpoints; new, empty or an "
                                   "earlier rlad run's (rlad-run.json), and never a folder holding an input", "run")
    seed: int = _f(0, "seed of data, sampling and initialization (in [-2**63, 2**63), as eval_seed)", "run")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)", "run")
    dtype: str = _f("auto", "float32, bfloat16 (bf16 autocast, on a CPU too) or auto (bf16 autocast on a GPU, none "
                            "on a CPU); the student's parameters stay float32", "run")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)", "run")
    quiet: bool = _f(False, "no progress bars (log lines only)", "run")
    dist_timeout: float = _f(300.0, "torchrun: seconds a rank waits in a collective (all-reduce, barrier, ...) before "
                                    "it fails; a rank that died or hangs then ends the job instead of blocking it",
                             "run")
    overwrite: bool = _f(False, "start over in an out_dir that holds an earlier rlad run: delete the files that run "
                                "wrote (config.json, metrics, checkpoints/step_*, summary and plots; anything else is "
                                "left alone); without it, such an out_dir is refused unless resume=true", "run")

    # models
    student: str = _f("preset:tiny-student", "student: path, hub id, .gguf file, config:<json> or "
                                             "preset:<name>", "models")
    teacher: str | None = _f(None, f"teacher ({', '.join(TEACHER_ALGOS)}): path, hub id, .gguf file, "
                                   "config:<json> or preset:<name>", "models")
    ref: str | None = _f(None, "reference model for ref_kl_coef (default: a frozen copy of the initial student)",
                         "models")
    tokenizer: str | None = _f(None, "tokenizer path or hub id, or a .gguf file's (default: the student's if it is "
                                     "a path or hub id, else the built-in tokenizer)", "models")
    prompt_template: str = _f("{prompt}\n", "how a prompt is shown to the model; must contain {prompt}; with the chat "
                                           "template, its text (stripped) is the user message", "models")
    chat_template: str = _f("auto", "build each prompt with the tokenizer's chat template (the assistant's turn "
                                    "opened; no bos added where the template writes it): auto (when the tokenizer has "
                                    "one, as instruct models' do), on or off", "models")
    system_prompt: str | None = _f(None, "with the chat template: the system message (none: the chat template's "
                                         "own default, if any; '': an empty one, which drops such a default, as "
                                         "SmolLM2's 19-token one)", "models", empty_is_text=True)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward (GPU memory)", "models")

    # task
    task: str = _f("arithmetic", "knights, arithmetic, chains, echo, or jsonl:<path>", "task")
    levels: list[int] = _f([], "difficulty levels to train on (default: all of the task's)", "task")
    reward: str = _f("exact", "for jsonl tasks (task or eval_task): exact, numeric, contains or module:function; "
                              "a built-in task has its own verifier", "task")
    answer_pattern: str | None = _f(None, "how the answer is read from a response: a regular expression (Python re) "
                                          "whose last match is the answer (its first group if it has one, else the "
                                          "whole match); none: the text after the last '####', to the end of its "
                                          "line. The built-in rewards compare what it reads; a module:function reward "
                                          "gets the whole response", "task")
    reward_timeout: float = _f(60.0, "seconds one call of a module:function reward may take; a longer call stops the "
                                     "run with an error naming the reward and the example (0: no limit)", "task")
    reward_errors: str = _f("fail", "a module:function reward that raises, or returns anything but a finite real "
                                    "number in [-1000, 1000]: fail (stop the run with an error naming the reward, "
                                    "the example and the value) or zero (score that response 0, count it in the "
                                    "metrics as reward_errors, go on)", "task")

    # rollout
    steps: int = _f(50, "RL steps (one rollout batch each)", "rollout")
    prompts_per_step: int = _f(16, "prompts per rollout batch", "rollout")
    group_size: int = _f(8, "G: responses sampled per prompt (>= 2)", "rollout")
    temperature: float = _f(1.0, "sampling temperature, in [{:g}, {:g}] (logits / T in float32: below {:g}, "
                                 "rounding swamps the log-prob ratios; above {:g}, sampling is near-uniform); "
                                 "log-probs use the same".format(*TEMPERATURE_RANGE, *TEMPERATURE_RANGE), "rollout")
    top_p: float = _f(1.0, "nucleus sampling", "rollout")
    stop: list[str] = _f([], "stop strings: a response also ends where the first of them ends (kept in the "
                             "response, not truncated); it always ends at the EOS and at the model's end-of-turn "
                             "token(s) (its generation_config.eos_token_id)", "rollout")
    max_new_tokens: int | None = _f(None, "longest response, in tokens (None: from the task and levels: the "
                                          "longest worked solution, x1.5 rounded up and at least +16; at least 256 "
                                          "when JSONL examples have only answers; the run prints the value and "
                                          "config.json records it)", "rollout")
    drop_truncated: bool = _f(False, "leave truncated responses (cut off at max_new_tokens before their EOS) out of "
                                     "the loss: their tokens get weight 0 and leave the normalizer, while their "
                                     "rewards still count in their groups' advantages; DAPO's overlong filtering "
                                     "(Yu et al. 2025). sft: the teacher's truncated solutions are left out of its "
                                     "pool", "rollout")

    # algorithm (also the policy options inherited from PolicyOptions: alpha, eps_low, eps_high,
    # teacher_clamp, teacher_clamp_grad, the gates, dual_clip, mixture, ref_kl_coef, entropy_coef,
    # ratio_level, objective, cispo_max, kd_estimator)
    algo: str = _f("rlad", "rlad (TRRD), grpo, kdrl, opd (on-policy distillation), sft (offline distillation) or "
                           "finetune (supervised fine-tuning on the task's worked solutions, no teacher)",
                   "algorithm")
    adv_std_norm: bool = _f(True, "divide group advantages by their std (False: Dr. GRPO)", "algorithm")
    eps_high: float | None = option("eps_high", default=None, default_text=EPS_HIGH_DEFAULT)  # None: resolved
    aggregation: str = _f("token_mean", "token_mean (global over the batch), seq_mean (each response's token mean, "
                                        "then the mean over responses), constant, or rlad_paper (the RLAD paper's "
                                        "Eq. 1/4: each response's token mean, then the mean over its group's "
                                        "responses, then over the groups; the same as seq_mean unless drop_truncated "
                                        "leaves groups with different numbers of responses)", "algorithm")
    kd_variant: str = _f("recipe", "kdrl: recipe (the KDRL paper's: kd_estimator, kd_beta annealed to kd_beta_min, "
                                   "kd_reward_mask) or rlad_paper (KDRL as the RLAD paper runs it, arXiv 2602.22495: "
                                   "GRPO with its reference KL replaced by KL(student || teacher), i.e. + kd_beta "
                                   "k3(lp_teacher - lp) on every token, k3 and the coefficient constant, no reward "
                                   "mask; kd_estimator, kd_beta_min, kd_beta_decay and kd_reward_mask unused, "
                                   "ref_kl_coef must be 0)", "algorithm")
    kd_estimator: str = option("kd_estimator", default="k2")  # kdrl always adds a KD term
    kd_beta: float = _f(5e-3, "kdrl: initial KD coefficient", "algorithm")
    kd_beta_min: float = _f(1e-3, "kdrl: floor of the linearly annealed KD coefficient", "algorithm")
    kd_beta_decay: float = _f(5e-5, "kdrl: KD coefficient decrease per step", "algorithm")
    kd_reward_mask: bool = _f(True, "kdrl: no KD on responses whose reward is 1 (reward-guided KD)", "algorithm")
    opd_kind: str = _f("jsd", "opd: jsd or reverse_kl (full vocabulary), or sampled (-(lp - lp_T) advantage)",
                       "algorithm")
    opd_beta: float = _f(0.5, "opd jsd: JSD beta (0 forward KL, 1 reverse KL)", "algorithm")
    sft_prompts: int = _f(256, "sft: prompts the teacher solves to build the offline dataset", "algorithm")

    # optimization
    lr: float = _f(1e-4, "AdamW learning rate", "optimization")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optimization")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", "optimization")
    schedule: str = _f("constant", "learning-rate schedule after warmup: constant, linear or cosine", "optimization")
    warmup_steps: int = _f(0, "linear warmup, in optimizer steps", "optimization")
    grad_clip: float = _f(1.0, "max global gradient norm (0: off)", "optimization")
    ppo_epochs: int = _f(1, "passes over each rollout batch", "optimization")
    mini_batches: int = _f(2, "optimizer steps per pass: the batch is split into exactly this many mini-batches "
                              "(when they do not divide it, their sizes differ by one)", "optimization")
    micro_batch_size: int = _f(64, "sequences per forward/backward (gradient accumulation)", "optimization")
    micro_batch_tokens: int = _f(0, "token budget per forward/backward instead of micro_batch_size (0: off): rows "
                                    "sorted by length and packed so that rows x width <= this, each micro-batch cut "
                                    "to its own width (its longest prompt + longest response; no compute on the rest "
                                    "of the padding); a longer row goes alone. Also groups the old/teacher/ref "
                                    "scoring", "optimization")

    # evaluation
    eval_every: int = _f(10, "evaluate every N steps (0: only at the end)", "evaluation")
    eval_prompts: int = _f(128, "held-out prompts per level (distinct; never drawn for training), at most "
                                f"{MAX_EVAL_PROMPTS}; a built-in task's level with fewer distinct problems holds out "
                                "half of them, and one whose eval set would leave under a tenth of its problems to "
                                "training is refused", "evaluation")
    eval_seed: int = _f(0, "seed of the fixed eval set of each level (apart from seed, so that every run of a study "
                           "is scored on the same problems)", "evaluation")
    eval_task: str | None = _f(None, "evaluate on this task instead (jsonl:<path> or a built-in name); training "
                                     "rows that share a prompt with it are dropped, with a warning", "evaluation")
    eval_split: float | None = _f(None, "for a jsonl task without eval_task: the fraction of each level's distinct "
                                        "prompts held out for evaluation (default 0.1)", "evaluation")
    eval_samples: int = _f(0, "samples per prompt for mean@k / pass@k (0: greedy accuracy only)", "evaluation")
    eval_temperatures: list[float] = _f([], "with eval_samples: sample at each of these temperatures (distinct, each "
                                            "in the temperature's range), reported as mean@k_T<t> / pass@k_T<t> "
                                            "(mean@8_T0.6); empty: at the run's temperature, reported as mean@k",
                                        "evaluation")
    diagnostics: bool = _f(False, "the study's per-step diagnostics, for algorithms with group advantages "
                                  "(rlad, grpo, kdrl), at the cost of more forward passes: the batch scored again "
                                  "after the update (kl_old_new, room_used) and, with a teacher that the algorithm "
                                  "does not score, by the teacher (trrd_zeroed_frac, trrd_protected_frac, "
                                  "teacher_pref_frac: what TRRD at this run's alpha, clamp and clip would do); "
                                  "rlad/diagnostics.py defines each",
                           "evaluation")

    # checkpointing
    save_every: int = _f(10, "checkpoint every N steps (0: only at the end)", "checkpointing")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", "checkpointing")
    resume: bool = _f(False, "continue the run in out_dir from its latest usable checkpoint (a damaged one is "
                             "skipped with a warning); with no checkpoint yet, start it", "checkpointing")
    force_resume: bool = _f(False, "with resume: continue even though settings differ from the checkpoint's in "
                                   "ways that change the run (those listed in the error)", "checkpointing")

    def __post_init__(self):
        if self.eps_high is None:  # the algorithm's default, resolved once: config.json and a resume see the value
            self.eps_high = default_eps_high(self.algo, self.kd_variant)
        self.validate()

    # ------------------------------------------------------------------ the algorithm
    @property
    def algorithm(self) -> Algorithm:
        """The row of ``rlad.algorithms`` for ``algo`` (and ``opd_kind``)."""
        return find_algorithm(self.algo, self.opd_kind)

    @property
    def diagnosed(self) -> bool:
        """Whether the run computes ``diagnostics``: they are about group advantages' tokens."""
        return self.diagnostics and self.algorithm.advantages == GROUP

    @property
    def loads_teacher(self) -> bool:
        """Whether the run loads the teacher: the algorithm uses it, or ``diagnostics`` score the
        batches with it (TRRD's view of a grpo run)."""
        return bool(self.teacher) and (self.algorithm.needs_teacher or self.diagnosed)

    @property
    def paper_kd(self) -> bool:
        """kdrl as the RLAD paper runs it (``kd_variant="rlad_paper"``): GRPO's reference-KL term
        (k3, a constant coefficient, every response) pointed at the teacher."""
        return self.algorithm.kd and self.kd_variant == "rlad_paper"

    def kd_coef(self, step: int) -> float:
        """KDRL's linear annealing: beta_t = max(beta_0 - delta * t, beta_min); the RLAD paper's
        variant: kd_beta, constant."""
        if self.kd_variant == "rlad_paper":
            return self.kd_beta
        return max(self.kd_beta - self.kd_beta_decay * step, self.kd_beta_min)

    def policy_config(self, step: int) -> PolicyLossConfig | None:
        """The policy loss's options at ``step`` (None for an algorithm whose loss is not the policy
        loss): ``alpha`` with a TRRD ratio, else 1 (the PPO ratio); the KD term with the annealed
        ``kd_coef(step)`` for kdrl (the RLAD paper's variant: k3 at the constant kd_beta, the reference-KL
        term ``k3(lp_ref - lp)`` with the teacher's log-probs as ``lp_ref``: the same value and gradient);
        the clip, clamp, mixture, reference-KL and entropy settings as set."""
        from rlad_kernels import PolicyLossConfig

        alg = self.algorithm
        if alg.loss != POLICY:
            return None
        shared = {name: getattr(self, name) for name in POLICY_OPTIONS if name not in ("alpha", "kd_estimator")}
        estimator = ("k3" if self.paper_kd else self.kd_estimator) if alg.kd else None
        return PolicyLossConfig(alpha=self.alpha if alg.trrd else 1.0, kd_estimator=estimator,
                                kd_coef=self.kd_coef(step) if alg.kd else 0.0, **shared)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Every rule that needs no file and no model: types (strict: no strings or booleans for
        numbers, no NaN or infinity anywhere), ranges, choices, and the rules across settings. The
        rules that read the disk (out_dir, model paths, the task's data, the context length) are
        ``rlad.preflight``'s, also run before any work starts."""
        def bad(name, msg):
            raise ConfigError(f"config: {name}={getattr(self, name)!r}: {msg}", name)

        for f in fields(self):  # PolicyLossConfig checks the types of its own options (below)
            problem = None if f.name in POLICY_OPTIONS else type_problem(getattr(self, f.name), str(f.type))
            if problem:
                bad(f.name, problem)
        if self.algo not in ALGOS:
            bad("algo", f"unknown algorithm; choose one of {', '.join(ALGOS)}")
        if self.opd_kind not in OPD_KINDS:
            bad("opd_kind", f"choose one of {', '.join(OPD_KINDS)}")
        alg = self.algorithm
        if alg.needs_teacher and not self.teacher:
            bad("teacher", f"algo={self.algo!r} needs a teacher; set teacher=<path|hub id|preset:...> or use algo=grpo")
        if alg.batch == ROLLOUTS and self.group_size < 2:
            bad("group_size", "group advantages need at least 2 responses per prompt; set group_size >= 2")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "ppo_epochs", "mini_batches",
                     "micro_batch_size", "eval_prompts", "sft_prompts", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("eval_every", "save_every", "warmup_steps", "eval_samples", "threads", "micro_batch_tokens"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be a positive number")
        if (problem := temperature_problem(self.temperature)) is not None:
            bad("temperature", problem)
        for t in self.eval_temperatures:
            if (problem := temperature_problem(t)) is not None:
                bad("eval_temperatures", f"{t!r}: {problem}")
        if len(set(self.eval_temperatures)) != len(self.eval_temperatures):
            bad("eval_temperatures", "give each temperature once")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        self._check_policy_options(bad)
        if self.kd_estimator is None:
            bad("kd_estimator", f"choose one of {', '.join(e for e in KD_ESTIMATORS if e is not None)} (kdrl "
                                f"always adds a KD term; algo=grpo has none)")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"choose one of {', '.join(AGGREGATIONS)}")
        if self.kd_variant not in KD_VARIANTS:
            bad("kd_variant", f"choose one of {', '.join(KD_VARIANTS)}")
        if self.paper_kd and self.ref_kl_coef != 0:
            bad("ref_kl_coef", "kd_variant=rlad_paper puts the teacher in the reference-KL term (the RLAD paper's KDRL "
                               "replaces the reference KL by KL(student || teacher)); set ref_kl_coef=0, or "
                               "kd_variant=recipe")
        if not 0 <= self.opd_beta <= 1:
            bad("opd_beta", "must be in [0, 1]")
        if self.kd_beta < 0 or self.kd_beta_min < 0 or self.kd_beta_decay < 0:
            bad("kd_beta", "kd_beta, kd_beta_min and kd_beta_decay must be >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose one of {', '.join(DTYPES)}")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 disables clipping)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0 (0: no weight decay)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "two numbers in [0, 1)")
        problem = template_problem(self.prompt_template)
        if problem:
            bad("prompt_template", problem)
        if self.chat_template not in CHAT_MODES:
            bad("chat_template", f"choose one of {', '.join(CHAT_MODES)}")
        if (problem := answer_pattern_problem(self.answer_pattern)) is not None:
            bad("answer_pattern", problem)
        if (problem := stop_problem(self.stop)) is not None:
            bad("stop", problem)
        if not self.dist_timeout > 0:
            bad("dist_timeout", "must be > 0 seconds")
        if self.reward_timeout < 0:
            bad("reward_timeout", "must be >= 0 seconds (0: no limit)")
        if self.reward_errors not in REWARD_ERRORS:
            bad("reward_errors", f"choose one of {', '.join(REWARD_ERRORS)}")
        if self.resume and self.overwrite:
            bad("overwrite", "resume=true continues the run in out_dir and overwrite=true deletes it: choose one")
        if self.force_resume and not self.resume:
            bad("force_resume", "only applies with resume=true")
        batch = self.prompts_per_step * alg.responses_per_prompt(self.group_size)
        if self.mini_batches > batch:
            bad("mini_batches", f"cannot split a batch of {batch} sequences into {self.mini_batches} mini-batches")
        for name in ("task", "eval_task"):
            spec = getattr(self, name)
            if spec is not None and spec.startswith("jsonl:") and not Path(spec[len("jsonl:"):]).is_file():
                bad(name, "JSONL file not found")
        jsonl = [spec for spec in (self.task, self.eval_task) if spec is not None and spec.startswith("jsonl:")]
        if self.reward != "exact" and not jsonl:
            bad("reward", "applies to jsonl tasks only; the built-in task checks its answers with its own verifier")
        for name in ("seed", "eval_seed"):
            if (problem := seed_problem(getattr(self, name))) is not None:
                bad(name, problem)
        if self.eval_prompts > MAX_EVAL_PROMPTS:
            bad("eval_prompts", f"at most {MAX_EVAL_PROMPTS} per level (an accuracy over {MAX_EVAL_PROMPTS} prompts "
                                f"already has a standard error of at most 0.005)")
        if self.eval_split is not None:
            if not 0 < self.eval_split < 1:
                bad("eval_split", "must be in (0, 1)")
            if not self.task.startswith("jsonl:") or self.eval_task is not None:
                bad("eval_split", "only splits a jsonl task that has no eval_task (a built-in task holds out a "
                                  "fixed eval set of its own)")

    def _check_policy_options(self, bad) -> None:
        """The TRRD / PPO options are PolicyLossConfig's and are validated by it (one definition of
        each rule); its error is reported against the TrainConfig field, with the field's help."""
        from rlad_kernels import PolicyLossConfig

        options = {name: getattr(self, name) for name in POLICY_OPTIONS}
        try:
            PolicyLossConfig(**options)
        except (TypeError, ValueError) as err:
            for name in POLICY_OPTIONS:  # the field whose value alone is refused
                try:
                    PolicyLossConfig(**{name: options[name]})
                except (TypeError, ValueError) as own:
                    help_ = next(f.metadata["help"] for f in fields(self) if f.name == name)
                    bad(name, f"{str(own).replace('PolicyLossConfig.', '')} ({help_})")
            raise ConfigError(f"config: {options}: {err}", None) from None  # a rule across options

    # ------------------------------------------------------------------ resuming
    def resume_changes(self, saved: dict[str, Any]) -> list[str]:
        """The settings of this config that differ from ``saved`` (the config a checkpoint was
        written with) and change what the run computes, as ``"name: old -> new"``. Settings that
        ``saved`` lacks (written before they existed) count as their defaults. ``RESUME_SAFE`` may
        change; so may ``steps`` when neither run's schedule depends on it (constant after warmup)."""
        changes = []
        for f in fields(self):
            old = saved.get(f.name, SAVED_DEFAULTS.get(f.name, _default(f)))
            new = getattr(self, f.name)
            if f.name in RESUME_SAFE or old == new:
                continue
            if f.name == "steps" and self.schedule == "constant" and saved.get("schedule", "constant") == "constant":
                continue
            changes.append(f"{f.name}: {old!r} -> {new!r}")
        return changes

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; run `rlad train --help` for the list", None)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Settings from a YAML file, then ``overrides`` (the command line's flags). The file is read
        strictly: UTF-8, no key given twice, ``1e-4`` is a number, no YAML 1.1 form that YAML 1.2
        reads otherwise (``010``, ``1:30``, ``1_000``, ``yes``: ``yaml11_problem``), and each value must have its
        setting's type (a quoted ``"3"`` is not a number, ``"false"`` is not a boolean); an error
        names the file and the line."""
        overrides = overrides or {}
        values, lines = read_yaml(path)
        types = {f.name: str(f.type) for f in fields(cls)}
        for name, value in values.items():
            problem = type_problem(value, types[name]) if name in types else None  # even if a flag overrides it
            if problem:
                raise ConfigError(f"{path}:{lines[name]}: {name}: {value!r}: {problem}", name)
        try:
            return cls.from_dict({**values, **overrides}, source=str(path))
        except ConfigError as err:
            if err.field in values and err.field not in overrides:  # the file's value: say where it is
                raise ConfigError(f"{path}:{lines[err.field]}: {err}", err.field) from None
            raise

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        """Another config with ``changes``. A resolved default (``eps_high``) is a value by now and
        is kept: give ``eps_high=None`` with another ``algo`` to take that algorithm's."""
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """An invalid setting; ``field`` is its name (None for a rule across settings)."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.field = field


def seed_problem(seed: int) -> str | None:
    """Why ``seed`` cannot seed a run (``SEED_RANGE``), or None."""
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        return "must be an integer in [-2**63, 2**63)"
    return None


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a prompt template (``str.format`` with ``{prompt}`` as its only
    field, literal braces doubled), or None."""
    if "{prompt}" not in template:
        return "must contain {prompt}"
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        return (f"{{prompt}} must be its only field, got {type(e).__name__}: {e}; write a literal brace as "
                f"{{{{ or }}}}")
    return None


def answer_pattern_problem(pattern: str | None) -> str | None:
    """Why ``pattern`` is not an answer pattern (a Python regular expression), or None."""
    if pattern is None:
        return None
    try:
        re.compile(pattern)
    except re.error as e:
        return f"not a regular expression: {e}"
    return None


def stop_problem(stop: Sequence[str]) -> str | None:
    """Why ``stop`` is not a list of stop strings, or None."""
    return None if all(stop) else "an empty stop string would end every response at once; give non-empty strings"


def train_defaults() -> dict[str, Any]:
    """Every ``TrainConfig`` setting's default (``rlad eval`` takes those of the settings it shares)."""
    return {f.name: _default(f) for f in fields(TrainConfig)}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _kind(value) -> str:
    if value is None:
        return "null"
    for t, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                    (list, "a list"), (tuple, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def type_problem(value, annotation: str) -> str | None:
    """Why ``value`` does not have a TrainConfig field's type (the annotation as written: ``int``,
    ``float | None``, ``list[int]``, ...), or None. Strict: a boolean is not a number, a string is
    neither a number nor a boolean, and a float must be finite."""
    if annotation.endswith(" | None"):
        if value is None:
            return None
        annotation = annotation[:-len(" | None")]
    if annotation.startswith("list["):
        item = annotation[len("list["):-1]
        example = "[3]" if item == "int" else "[0.9, 0.999]"
        if not isinstance(value, (list, tuple)):
            return f"expected a list of {'integers' if item == 'int' else 'numbers'}, got {_kind(value)}; write " \
                   f"it as {example}"
        for i, v in enumerate(value):
            problem = type_problem(v, item)
            if problem:
                return f"item {i}: {problem}"
        return None
    quoted = isinstance(value, str) and value.strip() != ""
    if annotation == "bool":
        if isinstance(value, bool):
            return None
        return f"expected true or false, got {_kind(value)}" + ("; write it without quotes" if quoted else "")
    if annotation == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        hint = ""
        if quoted:
            hint = "; write the number without quotes"
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            hint = f"; write {int(value)}"
        return f"expected an integer, got {_kind(value)}{hint}"
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_kind(value)}" + ("; write the number without quotes" if quoted else "")
        return None if math.isfinite(value) else f"must be a finite number, got {value}"
    if annotation == "str":
        return None if isinstance(value, str) else f"expected a string, got {_kind(value)}"
    raise AssertionError(f"no type check for {annotation!r}")


def read_yaml(path) -> tuple[dict[str, Any], dict[str, int]]:
    """(settings, line of each setting) of a YAML file of settings, read strictly (see ``from_yaml``)."""
    import yaml

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}", None) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                          None) from None
    loader = _strict_loader()(text)
    try:
        node = loader.get_single_node()
        values = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(f"{where}: invalid YAML: {e.problem}{context}", None) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}", None) from None
    finally:
        loader.dispose()
    if values is None:  # an empty file
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level", None)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{path}: setting names must be strings, got {bad_keys!r}", None)
    return values, lines


@functools.cache
def _strict_loader():
    """Built on first use, so that ``rlad train --help`` does not import yaml."""
    import re

    import yaml

    class StrictLoader(yaml.SafeLoader):
        """PyYAML's safe loader (YAML 1.1) with YAML 1.2 fixes: ``1e-4`` is a float (1.1 wants
        ``1.0e-4``), a key given twice in a mapping is an error (1.1 keeps the last silently), and
        the plain scalars that YAML 1.1 reads otherwise than 1.2 are errors (``yaml11_problem``:
        ``010`` is 8, ``1:30`` is 90, ``1_000`` is 1000, ``0b101`` is 5, ``yes``/``off`` are
        booleans), each naming its line, column and how to write it plainly."""

        def _refuse_yaml11(self, node, construct):
            value = construct(self, node)
            problem = yaml11_problem(node.value, value) if node.style is None else None  # a plain scalar
            if problem:
                raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)
            return value

        def construct_yaml_int(self, node):
            return self._refuse_yaml11(node, yaml.SafeLoader.construct_yaml_int)

        def construct_yaml_float(self, node):
            return self._refuse_yaml11(node, yaml.SafeLoader.construct_yaml_float)

        def construct_yaml_bool(self, node):
            return self._refuse_yaml11(node, yaml.SafeLoader.construct_yaml_bool)

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"{key.value!r} is given twice (first on line {seen[key.value]})",
                            key.start_mark)
                    seen[key.value] = key.start_mark.line + 1
            return super().construct_mapping(node, deep)

    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    for tag, construct in (("int", StrictLoader.construct_yaml_int), ("float", StrictLoader.construct_yaml_float),
                           ("bool", StrictLoader.construct_yaml_bool)):
        StrictLoader.add_constructor(f"tag:yaml.org,2002:{tag}", construct)
    return StrictLoader


def yaml11_problem(text: str, value) -> str | None:
    """Why the plain YAML scalar ``text``, which PyYAML (YAML 1.1) reads as ``value`` (an int, a
    float or a boolean), must be refused: YAML 1.2 (and most readers of the same file) read it
    otherwise. None for the forms both read alike (``40``, ``-3``, ``3.0e-4``, ``0x1A``, ``.inf``,
    ``true``/``True``)."""
    quote = f'or quote it ("{text}") for the text'
    if isinstance(value, bool):
        if text.lower() in ("yes", "no", "on", "off"):
            return f"{text} is ambiguous: YAML 1.1 reads it as {str(value).lower()}, YAML 1.2 as text; write " \
                   f"{str(value).lower()}, {quote}"
        return None
    digits = text.lstrip("+-")
    plain = f"{value:g}" if isinstance(value, float) else str(value)
    if ":" in text:
        return f"{text} is ambiguous: YAML 1.1 reads it as the base-60 number {plain}, YAML 1.2 as text; write " \
               f"{plain}, {quote}"
    if "_" in text:
        return f"{text} is ambiguous: YAML 1.1 reads it as {plain} (underscores ignored), YAML 1.2 as text; write " \
               f"{plain}, {quote}"
    if isinstance(value, int) and digits.startswith("0b"):
        return f"{text} is ambiguous: YAML 1.1 reads it as binary ({value}), YAML 1.2 as text; write {value}, {quote}"
    if isinstance(value, int) and len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
        decimal = int(text, 10)
        return f"{text} is ambiguous: YAML 1.1 reads a leading zero as octal ({value}), YAML 1.2 as {decimal}; " \
               f"write {value} or {decimal}, {quote}"
    return None


def _parse_optional(cast, empty_is_text: bool = False):
    def parse(s: str):
        if s == "" and empty_is_text:
            return s
        return None if s.lower() in ("none", "null", "") else cast(s)
    return parse


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def help_order() -> list[dataclasses.Field]:
    """TrainConfig's fields as the flags are listed: in the order of the class, the inherited
    policy options right after ``algo``, kdrl's ``kd_estimator`` with ``kd_beta``."""
    own = [f for f in fields(TrainConfig) if f.name not in POLICY_OPTIONS]
    policy = {f.name: f for f in fields(TrainConfig) if f.name in POLICY_OPTIONS}
    kd = policy.pop("kd_estimator")  # kdrl's, listed with kd_beta
    at, kd_at = (next(i for i, f in enumerate(own) if f.name == name) for name in ("algo", "kd_beta"))
    return own[:at + 1] + list(policy.values()) + own[at + 1:kd_at] + [kd] + own[kd_at:]


def _flag_type(f: dataclasses.Field) -> dict[str, Any]:
    """argparse's type, nargs and metavar for a TrainConfig field, from its annotation as written
    (postponed evaluation): "float | None", "list[int]", ..."""
    casts = {"int": int, "float": float, "str": str, "bool": _parse_bool}
    t = str(f.type)
    if t.startswith("list[") and t.endswith("]"):
        return dict(type=casts[t[len("list["):-1]], nargs="+")
    if t.endswith(" | None"):
        base = t[:-len(" | None")]
        return dict(type=_parse_optional(casts[base], f.metadata.get("empty_is_text", False)), metavar=base.upper())
    return dict(type=casts[t], metavar=t.upper())


def add_config_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per TrainConfig field, grouped; an absent flag leaves no attribute (SUPPRESS), so
    only given flags override, including an explicit ``none``."""
    groups = {}
    for f in help_order():
        if f.name in skip:
            continue
        g = f.metadata.get("group", "algorithm")  # the inherited policy options are the algorithm's
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        groups[g].add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, dest=f.name,
                               help=f"{f.metadata['help']} (default: {f.metadata.get('default_text', _default(f))})",
                               **_flag_type(f))


def add_setting_arguments(parser: argparse.ArgumentParser, settings: dict[str, str],
                          notes: dict[str, str] | None = None) -> None:
    """Flags of another command (``rlad eval``) for TrainConfig settings: ``settings`` maps each
    flag's dest to its field, whose type and help the flag takes (with ``notes[dest]`` added); an
    absent flag is None, for the caller to fill (the run's value, else the field's default)."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    for dest, name in settings.items():
        f = by_name[name]
        note = f" {notes[dest]}" if notes and dest in notes else ""
        parser.add_argument("--" + dest.replace("_", "-"), default=None, dest=dest, **_flag_type(f),
                            help=f"{f.metadata['help']}{note} (default: the run's {name}, else {_default(f)})")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    given = vars(args)
    overrides = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
    values = dict(base or {})
    values.update(overrides)
    if getattr(args, "config", None):
        return TrainConfig.from_yaml(args.config, values)
    return TrainConfig.from_dict(values, source="command line")
