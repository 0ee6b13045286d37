"""Command line shared by the per-op benchmark scripts (``python -m benchmarks.bench_policy_loss``,
``bench_logprobs``, ``bench_divergence``): a sweep of shapes x providers x modes, appended to one
long-format CSV.

Rows are appended after each provider (a sweep killed part-way keeps what it measured). With a
deadline (``--budget-s``; the GPU session gives each of its steps one) a provider starts at a
shape only if ``estimate_s`` says it fits in what is left; a cell not started gets a ``skipped`` row
that says why. With ``--check``, each shape first compares the gradients of the providers that
compute the op's own loss (ours, eager, torch.compile; ``harness.agreement``), so a quick run such as
``--N 1024 --H 512 --V 32000 --providers rlad-torch eager --modes full --no-csv --check`` is both a
regression check and a timing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .harness import (
    MODES,
    RESULTS,
    Provider,
    Shape,
    agreement,
    append_csv,
    env_info,
    make_inputs,
    plot,
    print_rows,
    row_base,
    run,
)
from .providers import PROVIDERS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCRIPTS = {"policy": "bench_policy_loss", "logprobs": "bench_logprobs", "divergence": "bench_divergence"}
# the performance-bar shapes on a GPU (README.md: bf16, H=4096, V in {128256, 151936}, N in 8k..64k,
# teacher H=5120); small shapes elsewhere (the harness itself is what runs on a CPU)
GPU_DEFAULTS = dict(N=[8192, 16384, 32768, 65536], H=4096, V=[128256, 151936], H_t=5120, dtype="bf16")
CPU_DEFAULTS = dict(N=[512, 1024, 2048], H=256, V=[8192], H_t=320, dtype="fp32")


def parser(op: str, cuda: bool) -> argparse.ArgumentParser:
    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPTS[op]}",
                                 description=f"Benchmark the {op} op against the other providers.")
    ap.add_argument("--N", type=int, nargs="+", default=d["N"], help="token counts")
    ap.add_argument("--H", type=int, default=d["H"], help="hidden size")
    ap.add_argument("--V", type=int, nargs="+", default=d["V"], help="vocabulary sizes")
    ap.add_argument("--H-t", type=int, default=d["H_t"], help="teacher hidden size (divergence)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=d["dtype"])
    ap.add_argument("--providers", nargs="+", default=None, help="subset of providers (default: all)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence for providers taking [B, T, H]")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA uses do_bench)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "bench.csv", help="CSV to append rows to")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--plot", action="store_true", help="render plots from the CSV afterwards")
    ap.add_argument("--check", action="store_true",
                    help="before timing a shape, compare the gradients of the providers computing the op's own loss "
                         "(ours, eager, torch.compile) with the first of them")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start a provider at a shape only if its estimated time fits in what is left of this many "
                         "seconds (its compile time and its steady-state time scaled from the shapes it ran)")
    return ap


def select_providers(op: str, args: argparse.Namespace, ap: argparse.ArgumentParser | None = None) -> list[Provider]:
    providers = PROVIDERS[op](args.seq_len)
    if args.providers:
        unknown = set(args.providers) - {p.name for p in providers}
        if unknown:
            msg = f"unknown providers {sorted(unknown)}; known: {[p.name for p in providers]}"
            if ap is not None:
                ap.error(msg)
            raise ValueError(msg)
        providers = [p for p in providers if p.name in args.providers]
    return providers


def shapes(op: str, args: argparse.Namespace) -> list[Shape]:
    return [Shape(N=N, H=args.H, V=V, H_t=args.H_t if op == "divergence" else None, dtype=DTYPES[args.dtype],
                  seq_len=args.seq_len) for V in args.V for N in args.N]


# a provider's seconds at its first shape, before anything about it is measured
GUESS_S = {"torch.compile": 60.0, "default": 25.0}


def shape_size(shape: Shape) -> float:
    """The GEMM size the time of a shape scales with."""
    return float(shape.N) * shape.V * (shape.H + (shape.H_t or 0))


def estimate_s(history: list[dict], provider: str, size: float, guess: dict = GUESS_S) -> float:
    """Seconds one provider should take at a shape of ``size``: from the largest shape it ran, its
    steady-state time scaled to this size for about 10 calls (the warm-up, the memory call and
    do_bench's), plus its compile time where it compiles per shape (torch.compile); a first guess
    when it never ran. ``history``: dicts of provider, size, ms (median) and first_s (first call)."""
    runs = [h for h in history if h["provider"] == provider and h.get("ms")]
    if not runs:
        return guess.get(provider, guess["default"])
    h = max(runs, key=lambda r: r["size"])
    ms = h["ms"] * size / h["size"]
    compile_s = max(h["first_s"] - h["ms"] / 1e3, 0.0) if provider == "torch.compile" else 0.0
    return compile_s + 10 * ms / 1e3 + 0.5


def sweep(op: str, shapes: list[Shape], providers: list[Provider], device: torch.device, env: dict, *,
          modes: list[str], reps: int, csv_path: Path | None, deadline: float | None = None,
          history: list[dict] | None = None, guess: dict = GUESS_S,
          after_shape: Callable[[Shape, dict], None] | None = None, check: bool = False) -> list[dict]:
    """Every provider at every shape, in order; rows appended to ``csv_path`` after each provider.
    With a ``deadline`` (``time.time()`` seconds), a provider starts only if ``estimate_s`` (from
    ``history``, extended as providers finish) fits in what is left; otherwise a ``skipped`` row.
    ``check``: print ``harness.agreement`` of the providers at each shape before timing them.
    ``after_shape(shape, inputs)`` runs before a shape's inputs are freed."""
    history = [] if history is None else history
    all_rows: list[dict] = []

    def record(rows):
        print_rows(rows)
        all_rows.extend(rows)
        if csv_path is not None:
            append_csv(rows, env, csv_path)

    def skip(shape, names, why):
        print(f"{shape.label}: not started: {', '.join(names)} ({why})", flush=True)
        record([dict(row_base(op, n, shape), mode=m, status="skipped", note=f"not started: {why}")
                for n in names for m in modes])

    for shape in shapes:
        n = shape_size(shape)
        if deadline is not None:
            left, need = deadline - time.time(), min(estimate_s(history, p.name, n, guess) for p in providers)
            if need > left:
                skip(shape, [p.name for p in providers], f"{max(left, 0):.0f} s left, the fastest needs ~{need:.0f} s")
                continue
        t = time.time()
        inputs = make_inputs(shape, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{shape.label} {str(shape.dtype).replace('torch.', '')}: inputs made on {device.type} in "
              f"{time.time() - t:.1f} s", flush=True)
        if check:
            for name, what in agreement(providers, inputs):
                print(f"  check {name:<16} {what}", flush=True)
        for p in providers:
            if deadline is not None:
                est, left = estimate_s(history, p.name, n, guess), deadline - time.time()
                if est > left:
                    skip(shape, [p.name], f"estimated {est:.0f} s, {max(left, 0):.0f} s left")
                    continue
            rows = run(op, p, shape, inputs, modes, device, reps=reps)
            record(rows)
            history += [dict(provider=p.name, size=n, ms=r["ms_p50"], first_s=r["first_s"])
                        for r in rows if r["status"] == "ok" and r["mode"] == "full"]
        if after_shape is not None:
            after_shape(shape, inputs)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return all_rows


def main(op: str, argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = parser(op, cuda)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    env = env_info(device)
    providers = select_providers(op, args, ap)
    print(f"{op} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    deadline = time.time() + args.budget_s if args.budget_s is not None else None
    rows = sweep(op, shapes(op, args), providers, device, env, modes=args.modes, reps=args.reps,
                 csv_path=None if args.no_csv else args.csv, deadline=deadline, check=args.check)
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {args.csv}")
        if args.plot:
            for p in plot(args.csv, args.csv.parent):
                print(f"plot: {p}")
    return 0
