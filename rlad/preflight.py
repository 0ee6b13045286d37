"""What ``rlad train`` checks before it writes a file or loads a model's weights.

``TrainConfig.validate`` has already checked every setting on its own (types, ranges, choices);
``preflight`` checks what needs the disk or a model's config: the output folder, the device, the
model specs (a local folder that does not exist, a hub id that cannot be reached), the tokenizer,
the task's data (read and validated once, here), the training levels, the held-out eval set
(``rlad/heldout.py``: built here, and held out of the task's training draws), that the teacher
and the reference model share the run's tokenizer (``check_tokenizers``), a user reward function
(called once), and that the prompts plus ``max_new_tokens`` fit every model's context. Each
failure is a one-line ValueError naming the setting, the value and the fix.

``max_new_tokens`` unset (None) is resolved here from the task and levels
(``Task.response_budget``, see ``rlad.tasks.budget``); the run uses ``Setup.cfg``, which has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .algorithms import POLICY
from .config import TrainConfig
from .heldout import HeldOut, build_held_out
from .models import context_length, model_config, vocab_size
from .prompting import prompt_template
from .rollout import check_context, check_text_chars, max_token_chars, prompt_lengths
from .rundir import check_out_dir
from .runtime import resolve_device, tokenizer_for, tokenizer_spec
from .tasks import Example, JsonlTask, Task, get_task
from .tokenizer import ASSET, TOKENIZER_FILES, carries_tokenizer, load_tokenizer, tokenizer_mismatch


@dataclass
class Setup:
    """What the checks built and the run reuses."""

    device: torch.device
    tok: Any
    task: Task
    levels: list[int]
    held: HeldOut  # the eval set and its scorer; ``task`` never draws its prompts
    cfg: TrainConfig  # the run's settings, max_new_tokens resolved
    template: str  # the prompt template, the chat template applied (rendered once: a template may read the date)

    @property
    def eval_set(self) -> list[Example]:
        return self.held.examples


def models_of(cfg: TrainConfig) -> dict[str, str]:
    """The models the run loads, by role: the student, the teacher when the algorithm uses one,
    and the reference model when ``ref_kl_coef > 0`` names one (else it is a copy of the student)."""
    alg = cfg.algorithm
    roles = {"student": cfg.student}
    if cfg.loads_teacher:
        roles["teacher"] = cfg.teacher
    if cfg.ref and cfg.ref_kl_coef > 0 and alg.loss == POLICY:
        roles["ref"] = cfg.ref
    return roles


def tokenizer_source(cfg: TrainConfig) -> str:
    """Where the run's tokenizer comes from, for messages."""
    spec = tokenizer_spec(cfg.student, cfg.tokenizer or None)
    if spec is None:
        return f"the built-in tokenizer ({ASSET})"
    return repr(spec) if cfg.tokenizer else f"{spec!r} (the student's)"


def check_tokenizers(cfg: TrainConfig, roles: dict[str, str], tok) -> None:
    """The teacher and the reference model must use the run's tokenizer: the same id for every
    token and the same special tokens (``tokenizer_mismatch``), or the teacher's log-probs score
    other tokens than the student's. A ``preset:`` or ``config:`` model is built for the run's
    tokenizer; a folder or hub id with its own tokenizer (a GGUF's is in its metadata) is compared;
    a folder without tokenizer files (or a hub id whose tokenizer cannot be loaded) is assumed to
    share the run's, with a note, and only its vocabulary size is checked when it is loaded (``models.check_vocab``)."""
    source = tokenizer_source(cfg)
    run_spec = tokenizer_spec(cfg.student, cfg.tokenizer or None)
    for role, spec in roles.items():
        if role == "student" or spec.startswith(("preset:", "config:")) or spec == run_spec:
            continue
        local = Path(spec)
        if local.is_dir() and not carries_tokenizer(spec):
            print(f"note: {role} {spec!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): assumed to share "
                  f"the run's tokenizer {source}; only its vocabulary size is checked", flush=True)
            continue
        try:
            own = load_tokenizer(spec)
        except ValueError as err:
            if local.is_dir():
                raise ValueError(f"config: {role}: {err}") from None
            print(f"note: {role} {spec!r}: no tokenizer could be loaded ({err}): assumed to share the run's "
                  f"tokenizer {source}; only its vocabulary size is checked", flush=True)
            continue
        problem = tokenizer_mismatch(tok, own, names=("the run's", f"the {role}'s"))
        if problem:
            raise ValueError(f"config: {role}: the tokenizer of the {role} {spec!r} differs from the run's tokenizer "
                             f"{source}: {problem}; distillation needs the same token ids and special tokens on "
                             f"both sides: use a {role} trained with the student's tokenizer")


def check_vocab_sizes(cfg: TrainConfig, roles: dict[str, str], configs: dict[str, Any], tok) -> None:
    """Before any model loads, from their configs: the student's head must have a row for each
    token of the run's tokenizer (a smaller one fails with an IndexError on the first token past
    it), and the teacher's and the reference model's at least as many as the student's
    (``models.check_vocab``, whose wording this keeps, checks the loaded heads again)."""
    n = len(tok)
    sizes = {role: v for role, c in configs.items() if (v := vocab_size(c)) is not None}
    student = sizes.get("student")
    if student is not None and student < n:
        raise ValueError(f"config: student: {roles['student']!r} has vocab_size {student} in its config, fewer than "
                         f"the {n} tokens of the run's tokenizer {tokenizer_source(cfg)}: token ids past "
                         f"{student - 1} have no row in its head; use the student's own tokenizer, or a student "
                         f"trained with this one")
    least, whose = (student, "the student's") if student is not None else (n, "the run's tokenizer's")
    for role, v in sizes.items():
        if role != "student" and v < least:
            name = "reference model" if role == "ref" else role
            raise ValueError(f"config: {role}: the {name}'s vocabulary ({v}) is smaller than {whose} ({least}): "
                             f"{roles[role]!r} has vocab_size {v} in its config; they do not share a tokenizer, and "
                             f"distillation needs the same token ids on both sides")


def resolve_max_new_tokens(cfg: TrainConfig, task: Task, tok, levels: list[int]) -> TrainConfig:
    """``cfg`` with max_new_tokens from the task when unset (printed, with why); a warning when a
    value set cannot fit the longest reference response."""
    budget = task.response_budget(tok, levels)
    if cfg.max_new_tokens is None:
        print(f"max_new_tokens: {budget.tokens}, from the task ({budget.explain()}); set max_new_tokens to choose "
              f"another", flush=True)
        return cfg.replace(max_new_tokens=budget.tokens)
    if cfg.max_new_tokens < budget.longest:
        print(f"warning: max_new_tokens={cfg.max_new_tokens} cannot fit the longest {budget.what} ({budget.longest} "
              f"tokens with its EOS): responses that long are cut off before their answer; the task's default is "
              f"{budget.tokens} (max_new_tokens unset)", flush=True)
    return cfg


def inputs_of(cfg: TrainConfig) -> dict[str, str]:
    """Every local file or folder the run reads, by setting (models, tokenizer, task files, the
    reward's module): the out_dir may never be or hold one of them (``rundir.check_inputs``)."""
    found = {name: getattr(cfg, name) for name in ("student", "teacher", "ref", "tokenizer")}
    for name in ("task", "eval_task"):
        spec = getattr(cfg, name) or ""
        found[f"{name} file"] = spec[len("jsonl:"):] if spec.startswith("jsonl:") else None
    if ":" in (cfg.reward or ""):  # module:function: its module's file or package (found, not imported)
        import importlib.util

        try:
            spec = importlib.util.find_spec(cfg.reward.split(":")[0].split(".")[0])
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and spec.has_location:
            origin = Path(spec.origin)
            found["reward module"] = str(origin.parent if origin.name == "__init__.py" else origin)
    return {name: path for name, path in found.items() if path and not str(path).startswith(("preset:", "config:"))}


def preflight(cfg: TrainConfig) -> Setup:
    check_out_dir(cfg.out_dir, inputs_of(cfg))
    device = resolve_device(cfg.device)
    roles = models_of(cfg)
    configs = {}
    for role, spec in roles.items():  # folders and hub ids first: a missing student is named as such
        if not spec.startswith("preset:"):
            configs[role] = model_config(spec, None, role=f"config: {role}")
    tok = tokenizer_for(cfg.student, cfg.tokenizer)
    # rendered once for the run (a chat template on that the tokenizer lacks is refused here)
    template = prompt_template(tok, cfg.prompt_template, cfg.chat_template, cfg.system_prompt)
    if template != cfg.prompt_template:
        print(f"prompt: the tokenizer's chat template (chat_template={cfg.chat_template}): {template!r}", flush=True)
    for role, spec in roles.items():
        if spec.startswith("preset:"):
            configs[role] = model_config(spec, tok, role=f"config: {role}")

    check_vocab_sizes(cfg, roles, configs, tok)

    task = get_task(cfg.task, cfg.reward, reward_timeout=cfg.reward_timeout, reward_errors=cfg.reward_errors,
                    answer_pattern=cfg.answer_pattern)
    levels = list(cfg.levels) or list(task.levels)
    unknown = [lv for lv in levels if lv not in task.levels]
    if unknown:
        raise ValueError(f"config: levels={cfg.levels}: task {cfg.task!r} has levels {list(task.levels)}, not "
                         f"{unknown}")
    task.check_reward()
    check_tokenizers(cfg, roles, tok)
    # prompts plus responses must fit every model's positions (checked below, on their tokens); a
    # text too long for the shortest context even at the tokenizer's longest token is refused first,
    # by its length in characters, before anything tokenizes it
    limits = {role: n for role, c in configs.items() if (n := context_length(c)) is not None}
    role = min(limits, key=limits.get) if limits else None

    def fits(data: JsonlTask, examples) -> None:  # a data file's texts, by their length in characters
        if role is not None:
            check_text_chars(examples, template, limits[role], max_token_chars(tok),
                             what=f"the {role} {roles[role]!r}", where=data.path)

    if isinstance(task, JsonlTask):
        fits(task, task.examples)
    cfg = resolve_max_new_tokens(cfg, task, tok, levels)
    held = build_held_out(task, levels, per_level=cfg.eval_prompts, seed=cfg.eval_seed, eval_task=cfg.eval_task,
                          eval_split=cfg.eval_split, reward=cfg.reward, reward_timeout=cfg.reward_timeout,
                          reward_errors=cfg.reward_errors)
    if held.task is not task:  # an eval_task scores the eval set with its own reward
        held.task.check_reward()
    eval_set = held.examples
    if isinstance(held.task, JsonlTask) and held.task is not task:
        fits(held.task, eval_set)

    # prompts plus responses must fit every model's positions: all of a JSONL file's prompts, or
    # the held-out set's (a built-in task's prompts of a level have similar lengths; every batch
    # is checked again when it is generated)
    if limits:
        examples = (task.examples if isinstance(task, JsonlTask) else []) + eval_set
        lengths = prompt_lengths(tok, [e.prompt for e in examples], template)
        check_context(examples, lengths, cfg.max_new_tokens, limits[role], what=f"the {role} {roles[role]!r}")
    return Setup(device, tok, task, levels, held, cfg, template)
