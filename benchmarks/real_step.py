"""A training step on a real model, phase by phase, beside TRL's ``GRPOTrainer`` at the same settings.

    python -m benchmarks.real_step --student S --teacher T            # rlad grpo, rlad rlad, TRL GRPO
    python -m benchmarks.real_step --student S --teacher T --no-trl --steps 2 --out /tmp/x   # a smoke run

Each side runs in its own process, one after the other (so each has the cores, and its peak
memory is its own): ``rlad train`` (``rlad.launch.train``) with ``--algo grpo`` and with
``--algo rlad`` (the teacher's scoring added), then TRL's ``GRPOTrainer`` on the same student,
prompts (the task's, in the tokenizer's chat template: TRL renders conversational prompts with
it, rlad with ``chat_template=auto``), group size, response length, learning rate, clip and
number of optimizer steps per rollout batch (``mini_batches`` = TRL's ``steps_per_generation``),
with no reference model (beta 0). rlad's steps log their seconds by phase (generation, old /
teacher scoring, update: ``metrics.jsonl``); TRL's rollout batch is timed from its callbacks
(``steps_per_generation`` optimizer steps, generation included). The first step of each side
is a warm-up and is left out of the medians. Peak memory is each process's maximum resident
set size. Writes ``<out>/real_step.json`` and ``<out>/real_step.md`` with the machine, versions,
commit and date.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("generate_s", "score_old_s", "score_teacher_s", "update_s", "step_s")


def _settings(args) -> dict:
    return dict(task=args.task, levels=args.levels, prompt_template=args.prompt_template, group_size=args.group_size,
                prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens, lr=args.lr,
                mini_batches=args.mini_batches, seed=args.seed, system_prompt=args.system_prompt)


def rlad_worker(args, algo: str, out_dir: str) -> dict:
    """``rlad train`` for ``steps + 1`` steps in this process; the step records, the eval time."""
    from rlad.config import TrainConfig
    from rlad.launch import train

    cfg = TrainConfig(algo=algo, student=args.student, teacher=args.teacher if algo == "rlad" else None,
                      steps=args.steps + 1, eval_every=0, eval_prompts=args.eval_prompts, eval_samples=0,
                      save_every=0, threads=args.threads, quiet=True, out_dir=out_dir, dtype=args.dtype,
                      micro_batch_size=args.micro_batch_size, **_settings(args))
    train(cfg)
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("eval")]
    return {"steps": steps, "eval_s": [r["eval_s"] for r in records if r.get("eval")]}


def trl_worker(args, out_dir: str) -> dict:
    """TRL's GRPOTrainer for ``steps + 1`` rollout batches; the seconds of each (callbacks)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlad.tasks import Example, get_task
    from rlad.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    n = (args.steps + 1) * args.prompts
    examples = task.sample(random.Random(args.seed), n, args.levels)
    tok = load_tokenizer(args.student)
    chat = bool(getattr(tok, "chat_template", None))  # as rlad's chat_template=auto
    if chat:  # conversational prompts: TRL renders them with the tokenizer's chat template
        system = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
        prompts = [[*system, {"role": "user", "content": args.prompt_template.format(prompt=e.prompt).strip()}]
                   for e in examples]
    else:
        prompts = [args.prompt_template.format(prompt=e.prompt) for e in examples]
    data = Dataset.from_list([{"prompt": p, "answer": e.answer} for p, e in zip(prompts, examples, strict=True)])

    def reward(completions, answer, **kw):
        texts = [c[0]["content"] if chat else c for c in completions]
        return [task.reward(Example("", a), t) for t, a in zip(texts, answer, strict=True)]

    batch = args.prompts * args.group_size
    config = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=args.dtype == "bfloat16", report_to=[],
                        save_strategy="no",
                        logging_steps=1, seed=args.seed, learning_rate=args.lr, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
                        num_generations=args.group_size, per_device_train_batch_size=batch // args.mini_batches,
                        steps_per_generation=args.mini_batches, gradient_accumulation_steps=1,
                        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
                        beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=0.2, loss_type="bnpo",
                        max_steps=(args.steps + 1) * args.mini_batches, disable_tqdm=True)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, state_args, state, control, **kw):
            if state.global_step % args.mini_batches == 0:  # a rollout batch's optimizer steps are done
                marks.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    trainer = GRPOTrainer(model, reward, args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"batch_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
            "reward": [h["reward"] for h in logs],
            "completion_len": [h.get("completions/mean_length") for h in logs]}


def _child(args, side: str) -> dict:
    """Run one side in a fresh process (``--worker side``); its result and its peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        given = sys.argv[1:] if args.argv is None else args.argv
        cmd = [sys.executable, "-m", "benchmarks.real_step", "--worker", side, "--result", str(result), *given]
        print(f"real_step: {side} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(HERE.parent), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"real_step: the {side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out = json.loads(result.read_text())
        out["wall_s"] = time.perf_counter() - t0
        return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.real_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="the student folder (a transformers folder, e.g. a "
                    "drop-layers one)")
    ap.add_argument("--teacher", required=True, help="the teacher folder (sharing the student's tokenizer)")
    ap.add_argument("--task", default="chains")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--prompt-template", default="{prompt} End with #### and the answer.")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=57)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-8, help="default 1e-8: the model barely moves, so every side "
                    "samples responses of the starting student's lengths (a step's time follows them)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts per level of the final eval")
    ap.add_argument("--system-prompt", default=None, help="the system message (default: the chat template's own; "
                    "'' an empty one), on every side")
    ap.add_argument("--micro-batch-size", type=int, default=64, help="rlad's sequences per forward/backward "
                    "(TRL's: its per-device batch, the rollout batch over --mini-batches)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: bf16 autocast "
                    "on every side (rlad --dtype bfloat16, TRL bf16=True)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-trl", action="store_true", help="leave TRL's side out")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", choices=("grpo", "rlad", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = argv

    if args.worker:  # one side, in its own process
        with tempfile.TemporaryDirectory() as tmp:
            res = trl_worker(args, tmp) if args.worker == "trl" else rlad_worker(args, args.worker, tmp + "/run")
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.result).write_text(json.dumps(res))
        return 0

    import torch

    from .harness import command_line, env_info, write_report

    env = env_info(torch.device("cpu"))
    sides = {side: _child(args, side) for side in ("grpo", "rlad", *(() if args.no_trl else ("trl",)))}
    rows, summary = [], {}
    for side in ("grpo", "rlad"):
        steps = sides[side]["steps"][1:]  # the first is the warm-up
        med = {k: _median([s.get(k) for s in steps]) for k in PHASES}
        tok_s = _median([s["tokens_per_s"] for s in steps])
        summary[side] = {**med, "tokens_per_s": tok_s, "eval_s": sides[side]["eval_s"],
                         "peak_rss_mb": sides[side]["peak_rss_mb"], "wall_s": sides[side]["wall_s"],
                         "reward": [s.get("reward") for s in sides[side]["steps"]]}
        length = _median([s["response_len"] for s in steps])
        summary[side]["response_len"] = length
        rows.append(f"| rlad `--algo {side}` | " + " | ".join("-" if med[k] is None else f"{med[k]:.2f}"
                                                          for k in PHASES)
                    + f" | {length:.1f} | {tok_s:.0f} | {sides[side]['peak_rss_mb']:.0f} |")
    if "trl" in sides:
        batch = _median(sides["trl"]["batch_s"][1:])
        length = _median(sides["trl"]["completion_len"][1:])  # one log per rollout batch; the first is the warm-up
        summary["trl"] = {"step_s": batch, "peak_rss_mb": sides["trl"]["peak_rss_mb"],
                          "wall_s": sides["trl"]["wall_s"], "batch_s": sides["trl"]["batch_s"],
                          "reward": sides["trl"]["reward"], "response_len": length,
                          "completion_len": sides["trl"]["completion_len"]}
        rows.append(f"| TRL `GRPOTrainer` | - | - | - | - | {batch:.2f} | "
                    f"{'-' if length is None else f'{length:.1f}'} | - | {sides['trl']['peak_rss_mb']:.0f} |")
        summary["trl_over_rlad_grpo"] = batch / summary["grpo"]["step_s"]
    command = command_line("real_step", argv)
    lines = [f"- student `{args.student}`, teacher `{args.teacher}`; task {args.task} levels {args.levels}, "
             f"{args.prompts} prompts x {args.group_size} responses, at most {args.max_new_tokens} new tokens, "
             f"{args.mini_batches} optimizer steps per batch, lr {args.lr:g}, {args.dtype}, rlad's micro-batches of "
             f"{args.micro_batch_size} sequences, system prompt "
             f"{'the template default' if args.system_prompt is None else repr(args.system_prompt)}; medians of "
             f"{args.steps} steps after a warm-up step", "",
             "| | generate (s) | score old (s) | score teacher (s) | update (s) | whole step (s) | response length "
             "(tokens) | tokens/s | peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if "trl" in sides:
        lines.append(f"TRL's step over rlad's (grpo, the same algorithm): {summary['trl_over_rlad_grpo']:.2f}x")
    for side in ("grpo", "rlad"):
        lines.append(f"- rlad {side}: final eval of {args.eval_prompts} prompts per level (greedy) "
                     f"{summary[side]['eval_s'][-1]:.1f} s; whole process {summary[side]['wall_s']:.0f} s")
    write_report(args.out, "real_step", "A training step on a real model, by phase (CPU)", env, command, lines,
                 threads=args.threads)
    (Path(args.out) / "real_step.json").write_text(json.dumps({"env": env, "command": command, **summary}, indent=2)
                                                   + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
