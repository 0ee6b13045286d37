"""Command line shared by the per-op benchmark scripts (bench_policy_loss.py, bench_logprobs.py,
bench_divergence.py): a sweep of shapes x providers x modes, appended to one long-format CSV.

Rows are appended after each provider (a sweep killed part-way keeps what it measured), and
``--budget-s`` starts a shape only when its estimated time (from the shapes measured so far,
``estimate_s``) fits in what is left: ``gpu_session.py`` runs the grid this way inside a time limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    MODES,
    RESULTS,
    Provider,
    Shape,
    append_csv,
    env_info,
    make_inputs,
    plot,
    print_rows,
    run,
)
from providers import PROVIDERS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the performance-bar shapes on a GPU (README.md: bf16, H=4096, V in {128256, 151936}, N in 8k..64k,
# teacher H=5120); small shapes elsewhere (the harness itself is what runs on a CPU)
GPU_DEFAULTS = dict(N=[8192, 16384, 32768, 65536], H=4096, V=[128256, 151936], H_t=5120, dtype="bf16")
CPU_DEFAULTS = dict(N=[512, 1024, 2048], H=256, V=[8192], H_t=320, dtype="fp32")


def parser(op: str, cuda: bool) -> argparse.ArgumentParser:
    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    ap = argparse.ArgumentParser(description=f"Benchmark the {op} op against the other providers.")
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
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start a shape only if its estimated time fits in what is left of this many seconds "
                         "(from the shapes measured so far: a fixed part plus one proportional to N*V*(H+H_t); "
                         "the first shape's is --first-estimate-s)")
    ap.add_argument("--first-estimate-s", type=float, default=0.0,
                    help="estimated seconds of the first shape, for --budget-s (default 0: always started)")
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


def _size(shape: Shape) -> float:
    return float(shape.N) * shape.V * (shape.H + (shape.H_t or 0))


def estimate_s(done: list[tuple[Shape, float]], shape: Shape, first: float) -> float:
    """Seconds ``shape`` should take: a fixed part (compiling, e.g. torch.compile per shape) plus
    one proportional to the GEMM size, through the last two shapes; from one shape, all of its time
    scaled (an overestimate); from none, ``first``."""
    if not done:
        return first
    (s2, t2) = done[-1]
    if len(done) > 1:
        (s1, t1) = done[-2]
        if _size(s2) != _size(s1) and t2 > t1:
            b = (t2 - t1) / (_size(s2) - _size(s1))
            return max(t2 - b * _size(s2), 0.0) + b * _size(shape)
    return t2 * _size(shape) / _size(s2)


def sweep(op: str, args: argparse.Namespace, providers: list[Provider], device: torch.device, env: dict,
          on_provider: Callable[[Shape, Provider, list[dict]], None] | None = None) -> dict:
    """Every provider at every shape of ``args``; rows are appended to ``args.csv`` after each
    provider (unless ``args.no_csv``). Returns the rows, each shape's seconds, and the shapes not
    started for ``args.budget_s``."""
    t0 = time.perf_counter()
    all_rows: list[dict] = []
    done: list[tuple[Shape, float]] = []
    not_started: list[Shape] = []
    cuda = device.type == "cuda"
    for shape in shapes(op, args):
        if args.budget_s is not None:
            left = args.budget_s - (time.perf_counter() - t0)
            est = estimate_s(done, shape, args.first_estimate_s)
            if est > left:
                print(f"budget: not starting {shape.label} (estimated {est:.0f} s, {max(left, 0):.0f} s left)",
                      flush=True)
                not_started.append(shape)
                continue
        ts = time.perf_counter()
        inputs = make_inputs(shape, device)
        print(f"{shape.label} {args.dtype}", flush=True)
        for p in providers:
            rows = run(op, p, shape, inputs, args.modes, device, reps=args.reps)
            print_rows(rows)
            sys.stdout.flush()
            all_rows += rows
            if not args.no_csv:
                append_csv(rows, env, args.csv)
            if on_provider is not None:
                on_provider(shape, p, rows)
        del inputs
        if cuda:
            torch.cuda.empty_cache()
        done.append((shape, time.perf_counter() - ts))
    return dict(rows=all_rows, shape_s=done, not_started=not_started)


def main(op: str, argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = parser(op, cuda)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    env = env_info(device)
    providers = select_providers(op, args, ap)
    print(f"{op} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    result = sweep(op, args, providers, device, env)
    if not args.no_csv:
        print(f"appended {len(result['rows'])} rows to {args.csv}")
        if args.plot:
            for p in plot(args.csv, args.csv.parent):
                print(f"plot: {p}")
    return 0
