"""Held-out evaluation by construction: eval prompts never appear in training.

Prompts are compared by their normalized text (``prompt_key``: case-folded, whitespace
collapsed), so "Compute 3+4." and "compute  3+4. " are the same problem.

- A built-in task (a generator) gets a fixed eval set per level, drawn with a seed of its own
  (``eval_seed``, not the run's seed, so every run of a study is scored on the same problems);
  training then rejects any drawn problem whose key is in the eval set (``Task.hold_out``).
- A JSONL task is evaluated on ``eval_task`` (another JSONL file or a built-in task), or on a
  seeded fraction ``eval_split`` of its distinct prompts. Training rows whose prompt is in the
  eval set are dropped, with a warning that gives the count.

``HeldOut`` records the eval set's size per level; ``evaluate`` reports every accuracy with its
standard error.

``rlad eval`` of a run (``--run``, or a model inside the run's folder: ``run_of``) rebuilds the
run's held-out set with ``build_held_out`` from the run's config.json (``RUN_EVAL_SETTINGS``),
so it scores the prompts the run evaluated, never its training prompts.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .tasks import Example, JsonlTask, Task, get_task, prompt_key

# a level whose generator yields fewer distinct problems than asked for: draws tried before
# concluding so (at most DRAWS_PER_PROMPT per prompt asked, and STALE_DRAWS in a row that find
# nothing new), and the share of the distinct problems found that the eval set may take
DRAWS_PER_PROMPT = 20
STALE_DRAWS = 2000
MAX_EVAL_SHARE = 0.5
# the most of a level's distinct problems that the eval set may hold out of training
MAX_EVAL_COVER = 0.9
DEFAULT_JSONL_SPLIT = 0.1


@dataclass
class HeldOut:
    """The eval set, the task that scores it, and what was held out of training."""

    task: Task                  # scores the eval responses (the training task, or eval_task)
    examples: list[Example]
    dropped_from_training: int  # JSONL training rows removed because their prompt is in the eval set

    @property
    def keys(self) -> set[str]:
        return {prompt_key(e.prompt) for e in self.examples}

    @property
    def sizes(self) -> dict[int, int]:
        """Eval prompts per level, in the order the levels first appear."""
        return dict(Counter(e.level for e in self.examples))


def generated_eval_set(task: Task, levels: Sequence[int], per_level: int, seed: int) -> tuple[list[Example], list[str]]:
    """Up to ``per_level`` distinct problems per level from a generator task, each level drawn
    with its own fixed stream (``random.Random("<task>/eval/<seed>/L<level>")``), so the set of a
    level does not depend on which other levels are trained. A level with fewer distinct problems
    than asked for gives at most half of those found to evaluation (the rest stay trainable), with
    a note in the returned warnings."""
    out, warnings = [], []
    for level in sorted(set(levels)):
        rng = random.Random(f"{task.name}/eval/{seed}/L{level}")
        found: dict[str, Example] = {}
        stale = 0
        for _ in range(per_level * DRAWS_PER_PROMPT):
            ex = task.make(rng, level)
            stale = stale + 1 if found.setdefault(prompt_key(ex.prompt), ex) is not ex else 0
            if len(found) >= per_level or stale >= STALE_DRAWS:
                break
        picked = list(found.values())
        if len(picked) < per_level:  # a small level: keep part of it for training
            cap = max(1, int(len(picked) * MAX_EVAL_SHARE))
            warnings.append(f"level {level} of task {task.name!r} has only about {len(picked)} distinct problems; "
                            f"{cap} of them are held out for evaluation (eval_prompts={per_level} asked)")
            picked = picked[:cap]
        out += picked
    return out, warnings


def distinct_by_level(examples: Sequence[Example], levels: Sequence[int]) -> dict[int, list[Example]]:
    """The first example of each distinct prompt, per level (only ``levels``)."""
    seen: set[str] = set()
    out: dict[int, list[Example]] = {lv: [] for lv in sorted(set(levels))}
    for e in examples:
        k = prompt_key(e.prompt)
        if e.level in out and k not in seen:
            seen.add(k)
            out[e.level].append(e)
    return out


def fixed_eval_set(task: Task, levels: Sequence[int], per_level: int, seed: int) -> tuple[list[Example], list[str]]:
    """A task's own eval set, and notes: of a JSONL file, the first ``per_level`` distinct prompts
    of each level; of a generator, ``generated_eval_set``. ``rlad eval`` scores this set, and a
    run holds it out of training when the task is its ``eval_task``."""
    if isinstance(task, JsonlTask):
        groups = distinct_by_level(task.examples, levels)
        return [e for lv in sorted(groups) for e in groups[lv][:per_level]], []
    return generated_eval_set(task, levels, per_level, seed)


def build_held_out(task: Task, levels: Sequence[int], *, per_level: int, seed: int, eval_task: str | None = None,
                   eval_split: float | None = None, reward: str = "exact", reward_timeout: float = 60.0,
                   reward_errors: str = "fail", log=print) -> HeldOut:
    """The run's eval set (see the module docstring), with training held out of it: ``task`` is
    changed in place (a generator rejects eval prompts; a JSONL task drops their rows). Raises
    ValueError when nothing would be left to train on or to evaluate."""
    scorer, notes = task, []
    if eval_task is not None:
        scorer = get_task(eval_task, reward, reward_timeout=reward_timeout, reward_errors=reward_errors,
                          answer_pattern=task.answer_pattern)  # the run's responses, read the same way
        examples, notes = fixed_eval_set(scorer, scorer.levels, per_level, seed)
    elif isinstance(task, JsonlTask):
        fraction = DEFAULT_JSONL_SPLIT if eval_split is None else eval_split
        groups = distinct_by_level(task.examples, levels)
        examples = []
        for level, group in groups.items():  # a seeded split of each level's distinct prompts
            order = list(range(len(group)))
            random.Random(f"jsonl/eval/{seed}/L{level}").shuffle(order)
            n = min(per_level, max(1, round(len(group) * fraction)))
            if n >= len(group):
                raise ValueError(f"{task.path}: level {level} has {len(group)} distinct prompt(s), too few to hold "
                                 f"out {n} for evaluation and train on the rest; add data, or give eval_task")
            examples += [group[i] for i in sorted(order[:n])]
    else:
        examples, notes = generated_eval_set(task, levels, per_level, seed)
    for note in notes:
        log(f"note: {note}")
    if not examples:
        raise ValueError(f"eval_task={eval_task!r}: no evaluation prompts")
    held = HeldOut(scorer, examples, 0)
    dropped = task.hold_out(held.keys)
    if dropped and eval_task is None and isinstance(task, JsonlTask):  # the split itself, not an overlap
        log(f"note: the eval split holds {len(examples)} distinct prompt(s) ({dropped} row(s)) out of training")
    elif dropped:
        log(f"warning: {dropped} training example(s) of {task.name!r} share a prompt with the eval set and are left "
            f"out of training")
    if isinstance(task, JsonlTask):
        emptied = [lv for lv in levels if not task.by_level.get(lv)]
        if emptied:
            raise ValueError(f"{task.path}: every prompt of level(s) {emptied} is in the eval set, so none is left to "
                             f"train on; give an eval_task without them, or add data")
    if not isinstance(task, JsonlTask):
        check_trainable(task, levels, held, per_level=per_level, seed=seed)
    held.dropped_from_training = dropped
    return held


def check_trainable(task: Task, levels: Sequence[int], held: HeldOut, *, per_level: int, seed: int) -> None:
    """Refuse a generator's level whose eval set holds out more than ``MAX_EVAL_COVER`` of its
    distinct problems (training would draw the few left again and again, or, with none left, fail
    at its first step). Draws with a stream of its own until it has found problems enough outside
    the eval set, or ``STALE_DRAWS`` in a row that find nothing new: a bounded search."""
    for level in sorted(set(levels)):
        rng = random.Random(f"{task.name}/trainable/{seed}/L{level}")
        n_held = len({prompt_key(e.prompt) for e in held.examples if e.level == level})
        need = max(1, math.ceil(n_held * (1 - MAX_EVAL_COVER) / MAX_EVAL_COVER))
        free: set[str] = set()
        stale = 0
        while len(free) < need and stale < STALE_DRAWS:
            key = prompt_key(task.make(rng, level).prompt)
            if key in task.held_out or key in free:
                stale += 1
            else:
                free.add(key)
                stale = 0
        if len(free) < need:
            total = n_held + len(free)
            raise ValueError(f"config: eval_prompts={per_level}: level {level} of task {task.name!r} has about "
                             f"{total} distinct problems and the eval set holds out {n_held} of them, leaving "
                             f"{len(free)} to train on; lower eval_prompts (to {int(total * MAX_EVAL_SHARE)} or "
                             f"fewer, half of the level), or train on other levels")


# ----------------------------------------------------------------------------- rlad eval of a run
# rlad eval's settings that a run's config.json provides (rlad eval's name -> the run's setting),
# when the flag is not given: those that define the held-out set, then those of the run's own eval
RUN_EVAL_SETTINGS = {"task": "task", "eval_task": "eval_task", "levels": "levels", "prompts": "eval_prompts",
                     "eval_split": "eval_split", "eval_seed": "eval_seed", "reward": "reward",
                     "reward_timeout": "reward_timeout", "max_new_tokens": "max_new_tokens",
                     "prompt_template": "prompt_template", "samples": "eval_samples", "temperature": "temperature",
                     "top_p": "top_p", "chat_template": "chat_template", "system_prompt": "system_prompt",
                     "stop": "stop", "answer_pattern": "answer_pattern"}
TASK_SETTINGS = ("task", "eval_task", "levels", "eval_split", "reward", "max_new_tokens")  # of the run's task alone


def run_config(run) -> dict | None:
    """The settings of the rlad run in folder ``run`` (its config.json), or None when it is not one
    (a model's config.json has no ``task`` or ``eval_seed``)."""
    try:
        saved = json.loads((Path(run) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"task", "eval_seed", "out_dir"} <= saved.keys() else None


def run_of(model: str) -> Path | None:
    """The run folder ``model`` belongs to: the run folder itself, one of its checkpoints
    (``checkpoints/step_NNNNNN``) or that checkpoint's ``model/``, or an ``rlad export`` of one of
    its checkpoints (``rlad-export.json`` names the checkpoint); None for any other model."""
    from .checkpoint import EXPORT_MARKER
    from .rundir import STEP

    p = Path(model)
    if not p.is_dir():
        return None
    found = [p]
    if (p / EXPORT_MARKER).is_file():
        try:
            found.append(Path(json.loads((p / EXPORT_MARKER).read_text())["checkpoint"]).parent.parent)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    p = p.resolve()
    if p.name == "model":
        p = p.parent
    if STEP.match(p.name) and p.parent.name == "checkpoints":
        found.append(p.parent.parent)
    return next((r for r in found if run_config(r) is not None), None)


def run_model(run) -> str:
    """The model of the run's newest complete checkpoint that has one (``model/``: every
    single-process checkpoint, and a torchrun run's last)."""
    from .checkpoint import MARKER, checkpoints

    for ckpt in checkpoints(run):
        if (ckpt / MARKER).is_file() and (ckpt / "model" / "config.json").is_file():
            return str(ckpt / "model")
    raise ValueError(f"--run {run}: no checkpoint with a model/ folder; give --model (a checkpoint's model/ or an "
                     f"rlad export)")


def study_task(name: str, levels: Sequence[int], *, per_level: int, test_seed: int, validation_seed: int,
               log=print) -> tuple[Task, HeldOut, list[Example]]:
    """A built-in task for training a study's models, with the study's test set (the eval set
    ``rlad train`` holds out at ``eval_seed=test_seed``) and its validation set (``eval_seed=
    validation_seed``, the learning-rate sweep's) both held out of its draws: (task, test, validation)."""
    task = get_task(name)
    held = build_held_out(task, levels, per_level=per_level, seed=test_seed, log=log)
    validation, _ = generated_eval_set(task, levels, per_level, validation_seed)
    task.hold_out(held.keys | {prompt_key(e.prompt) for e in validation})
    return task, held, validation
