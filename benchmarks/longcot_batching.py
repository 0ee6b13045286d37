"""What token-budget micro-batches save on CPU: one ``rlad.train.update`` (forward, backward, no
weight change) over rows of very different lengths, split by ``--micro-batch-size`` (every
micro-batch as wide as the batch's longest row) and by ``--micro-batch-tokens`` (length-sorted,
each micro-batch cut to its own window).

    python -m benchmarks.longcot_batching                        # 16 rows, log-normal response lengths
    python -m benchmarks.longcot_batching --rows 4 --scale 3.0 --repeats 1 --out /tmp/x   # a smoke run

The rows are ``rlad.rollout.from_pairs`` rows (left-padded prompts, right-padded responses) of
random digits, response lengths drawn from a log-normal (``exp(N(scale, 0.8))`` words); the model
is ``preset:tiny-student`` on the built-in tokenizer. Reports the tokens each split computes
(padding included: rows x width, summed over micro-batches), the real tokens, and the fastest of
``--repeats`` timings of each (interleaved). Writes ``<out>/longcot_batching.md`` with the
machine, torch version, commit and date.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.longcot_batching", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--scale", type=float, default=5.0, help="log-normal mu of the response length in words")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import torch

    from rlad.batching import plan
    from rlad.config import TrainConfig
    from rlad.models import load_model
    from rlad.rollout import from_pairs, group_advantages, score
    from rlad.tasks import Example
    from rlad.tokenizer import load_tokenizer
    from rlad.train import update

    from .harness import command_line, env_info, write_report

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = env_info(torch.device("cpu"))
    tok = load_tokenizer()
    rng = random.Random(args.seed)
    B = args.rows
    words = [int(rng.lognormvariate(args.scale, 0.8)) + 1 for _ in range(B)]
    exs = [Example(prompt="Echo " + " ".join("7" for _ in range(rng.randint(2, 10))), answer="1") for _ in range(B)]
    resp = [" ".join(str(rng.randint(0, 9)) for _ in range(n)) for n in words]
    roll = from_pairs(tok, exs, resp, None, template="{prompt}\n", device="cpu")
    student = load_model("preset:tiny-student", tok, seed=args.seed)
    roll.old_logp = score(student, roll, temperature=1.0, micro_batch=B)
    roll.teacher_logp = roll.old_logp.clone()
    roll.rewards = torch.tensor([float(i % 2) for i in range(B)])
    roll.advantages = group_advantages(roll.rewards, 1 if B % 2 else 2, std_norm=False)
    L = roll.input_ids.shape[1]
    splits = {"micro_batch_size": dict(micro_batch_size=args.micro_batch_size),
              "micro_batch_tokens": dict(micro_batch_tokens=args.micro_batch_tokens)}
    parts = plan(roll.attention_mask, torch.arange(B), args.micro_batch_tokens)
    computed = {"micro_batch_size": B * L, "micro_batch_tokens": sum(len(r) * (c.stop - c.start) for r, c in parts)}
    groups = [len(r) for r, _ in parts]
    times: dict[str, list[float]] = {k: [] for k in splits}
    for _ in range(args.repeats):
        for name, kw in splits.items():
            cfg = TrainConfig(out_dir=str(Path(args.out) / "unused"), student="preset:tiny-student", task="echo",
                              algo="grpo", mini_batches=1, max_new_tokens=L, **kw)
            opt = torch.optim.SGD(student.parameters(), lr=0.0)  # the weights stay put: every repeat is the same
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
            t0 = time.perf_counter()
            update(cfg, student, None, roll, opt, sched, 0, contextlib.nullcontext, {"nan_skips": 0})
            times[name].append(time.perf_counter() - t0)
    real = int(roll.attention_mask.sum())
    lines = [f"- {B} rows, width {L} tokens, {real} real tokens; response lengths (tokens): "
             f"{sorted(roll.response_mask.sum(-1).tolist())}; model preset:tiny-student (hidden 64, 2 layers, "
             f"vocab {len(tok)}), grpo loss, forward + backward",
             f"- token-budget micro-batches: {groups} rows", "",
             f"| split | computed tokens (padding included) | fastest of {args.repeats} (s) | all (s) |",
             "|---|---|---|---|"]
    for name, kw in splits.items():
        value = next(iter(kw.values()))
        lines.append(f"| `{name}={value}` | {computed[name]} | {min(times[name]):.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in times[name])} |")
    write_report(args.out, "longcot_batching", "Token-budget micro-batches on CPU: one update over rows of mixed "
                 "lengths", env, command_line("longcot_batching", argv), lines, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
