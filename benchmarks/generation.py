"""A rollout's generation on a real model: ``rlad.decode`` against ``transformers``' ``generate``.

    python -m benchmarks.generation --model M                       # 8 prompts x 8, the chains task
    python -m benchmarks.generation --model M --system-prompt ''    # as studies/real_pair/quick.sh

Both sides are ``rlad.rollout.generate`` with the same prompts (the task's, in the tokenizer's chat
template) and the same per-row seeds, so they sample the same tokens: ``decode`` (each prompt
prefilled once for its group, a row dropped from the batch as it ends) and its fallback, the
prompts repeated G times through ``generate`` (every prompt prefilled G times, every row computed
until the last one ends). For each: the median seconds over ``--reps`` batches after a warm-up,
the tokens the responses hold against the row-steps decoded (``generate``: every row until the
longest response ends; ``decode``: each row until its own ends), and
whether the two sides' tokens are identical. Writes ``<out>/generation.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a transformers folder (or anything rlad loads)")
    ap.add_argument("--task", default="chains")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--prompt-template", default="{prompt} End with #### and the answer.")
    ap.add_argument("--system-prompt", default=None, help="the system message (default: the chat template's own)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=57)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3, help="timed batches (after one warm-up batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import torch

    import rlad.rollout as rollout
    from rlad.models import load_model
    from rlad.prompting import prompt_template
    from rlad.tasks import get_task
    from rlad.tokenizer import load_tokenizer

    from .harness import command_line, env_info, write_report

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, tok)
    task = get_task(args.task)
    template = prompt_template(tok, args.prompt_template, "auto", args.system_prompt)
    decode = rollout.decode

    def batch(rep: int, side: str):
        examples = task.sample(random.Random(rep), args.prompts, args.levels)
        rollout.decode = decode if side == "decode" else (lambda *a, **k: None)  # None: the generate fallback
        try:
            t0 = time.perf_counter()
            roll = rollout.generate(model, tok, examples, task, group_size=args.group_size,
                                    temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                    template=template, seeds=[7919 * (rep * args.prompts + i)
                                                              for i in range(args.prompts)])
            return time.perf_counter() - t0, roll
        finally:
            rollout.decode = decode

    results = {}
    for side in ("generate", "decode"):
        print(f"generation: {side} ...", flush=True)
        runs = [batch(rep, side) for rep in range(args.reps + 1)]
        results[side] = runs
    same = all(torch.equal(a[1].input_ids, b[1].input_ids)
               for a, b in zip(results["generate"], results["decode"], strict=True))
    rows = []
    for side, label in (("generate", "`generate`, the prompts repeated G times (before)"),
                        ("decode", "`rlad.decode` (now)")):
        secs = statistics.median(t for t, _ in results[side][1:])
        produced = sum(int(r.response_mask.sum()) for _, r in results[side][1:])
        # generate steps every row until the longest response ends; decode steps a row until its own ends
        computed = produced if side == "decode" else \
            sum(len(r) * int(r.response_mask.sum(-1).max()) for _, r in results[side][1:])
        rows.append(f"| {label} | {secs:.2f} | {produced} | {computed} |")
    speedup = statistics.median(t for t, _ in results["generate"][1:]) / \
        statistics.median(t for t, _ in results["decode"][1:])
    lines = [f"- model `{args.model}`; task {args.task} levels {args.levels}, {args.prompts} prompts x "
             f"{args.group_size} responses, at most {args.max_new_tokens} new tokens, T = {args.temperature:g}, "
             f"per-row seeds; system prompt "
             f"{'the template default' if args.system_prompt is None else repr(args.system_prompt)}; medians of "
             f"{args.reps} batches after a warm-up batch", "",
             "| | seconds per batch | response tokens | row-steps decoded |", "|---|---|---|---|", *rows, "",
             f"decode is {speedup:.2f}x as fast; the two sides' tokens are "
             f"{'identical' if same else 'NOT identical'} in every batch"]
    write_report(args.out, "generation", "A rollout's generation on a real model (CPU)", env_info(torch.device("cpu")),
                 command_line("generation", argv), lines, threads=args.threads)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
