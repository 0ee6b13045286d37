"""What ``rlad train`` checks before it writes a file or loads a model's weights.

``TrainConfig.validate`` has already checked every setting on its own (types, ranges, choices);
``preflight`` checks what needs the disk or a model's config: the output folder, the device, the
model specs (a local folder that does not exist, a hub id that cannot be reached), the tokenizer,
the task's data (read and validated once, here), the training levels, the held-out eval set
(``rlad/heldout.py``: built here, and held out of the task's training draws), a user reward function
(called once), and that the prompts plus ``max_new_tokens`` fit every model's context. Each
failure is a one-line ValueError naming the setting, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .algorithms import POLICY
from .config import TrainConfig
from .heldout import HeldOut, build_held_out
from .models import context_length, model_config
from .rollout import check_context, prompt_lengths
from .rundir import check_out_dir
from .runtime import resolve_device, tokenizer_for
from .tasks import Example, JsonlTask, Task, get_task


@dataclass
class Setup:
    """What the checks built and the run reuses."""

    device: torch.device
    tok: Any
    task: Task
    levels: list[int]
    held: HeldOut  # the eval set and its scorer; ``task`` never draws its prompts

    @property
    def eval_set(self) -> list[Example]:
        return self.held.examples


def models_of(cfg: TrainConfig) -> dict[str, str]:
    """The models the run loads, by role: the student, the teacher when the algorithm uses one,
    and the reference model when ``ref_kl_coef > 0`` names one (else it is a copy of the student)."""
    alg = cfg.algorithm
    roles = {"student": cfg.student}
    if cfg.teacher and alg.needs_teacher:
        roles["teacher"] = cfg.teacher
    if cfg.ref and cfg.ref_kl_coef > 0 and alg.loss == POLICY:
        roles["ref"] = cfg.ref
    return roles


def preflight(cfg: TrainConfig) -> Setup:
    check_out_dir(cfg.out_dir)
    device = resolve_device(cfg.device)
    roles = models_of(cfg)
    configs = {}
    for role, spec in roles.items():  # folders and hub ids first: a missing student is named as such
        if not spec.startswith("preset:"):
            configs[role] = model_config(spec, None, role=f"config: {role}")
    tok = tokenizer_for(cfg.student, cfg.tokenizer)
    for role, spec in roles.items():
        if spec.startswith("preset:"):
            configs[role] = model_config(spec, tok, role=f"config: {role}")

    task = get_task(cfg.task, cfg.reward, reward_timeout=cfg.reward_timeout, reward_errors=cfg.reward_errors)
    levels = list(cfg.levels) or list(task.levels)
    unknown = [lv for lv in levels if lv not in task.levels]
    if unknown:
        raise ValueError(f"config: levels={cfg.levels}: task {cfg.task!r} has levels {list(task.levels)}, not "
                         f"{unknown}")
    task.check_reward()
    held = build_held_out(task, levels, per_level=cfg.eval_prompts, seed=cfg.eval_seed, eval_task=cfg.eval_task,
                          eval_split=cfg.eval_split, reward=cfg.reward, reward_timeout=cfg.reward_timeout,
                          reward_errors=cfg.reward_errors)
    held.task.check_reward()
    eval_set = held.examples

    # prompts plus responses must fit every model's positions: all of a JSONL file's prompts, or
    # the held-out set's (a built-in task's prompts of a level have similar lengths; every batch
    # is checked again when it is generated)
    limits = {role: n for role, c in configs.items() if (n := context_length(c)) is not None}
    if limits:
        role = min(limits, key=limits.get)
        examples = (task.examples if isinstance(task, JsonlTask) else []) + eval_set
        lengths = prompt_lengths(tok, [e.prompt for e in examples], cfg.prompt_template)
        check_context(examples, lengths, cfg.max_new_tokens, limits[role], what=f"the {role} {roles[role]!r}")
    return Setup(device, tok, task, levels, held)
