"""Time forward+backward of the three implementations at one shape, so regressions are visible.

    python -m benchmarks.time_impls                       # CPU: torch vs naive, small shape
    python -m benchmarks.time_impls --n 8192 --h 4096 --v 128256 --dtype bf16   # on a GPU

Each implementation's result is checked against the first one before it is timed. On CUDA the
median of ``triton.testing.do_bench`` is reported with the peak memory increase; on CPU the
median wall time of ``--reps`` runs. The full benchmark suite (other providers, CSV, plots)
is separate; this is the quick check.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from rlad_kernels import PolicyLossConfig, linear_logprobs, linear_policy_loss

from . import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(n, h, v, dtype, device, seed=0):
    """Peaked, sampled inputs from the benchmark harness, with hidden and weight as leaves."""
    x = harness.make_inputs(harness.Shape(N=n, H=h, V=v, dtype=dtype), torch.device(device), seed)
    return (x["hidden"].requires_grad_(), x["weight"].requires_grad_(), x["targets"], x["advantages"],
            x["old_logp"], x["teacher_logp"])


def step(op, impl, inputs):
    hidden, weight, targets, adv, old, teacher = inputs
    hidden.grad = weight.grad = None
    if op == "logprobs":
        lp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
        loss = lp.sum() + 0.01 * ent.sum()
    else:
        loss = linear_policy_loss(hidden, weight, targets, adv, old, teacher_logp=teacher,
                                  config=PolicyLossConfig(), impl=impl).loss
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=["policy", "logprobs"], default="policy")
    ap.add_argument("--n", type=int, default=1024, help="tokens")
    ap.add_argument("--h", type=int, default=512, help="hidden size")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--impls", default=None, help="comma list; default triton,torch,naive on CUDA, torch,naive on CPU")
    ap.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    impls = (args.impls or ("triton,torch,naive" if device == "cuda" else "torch,naive")).split(",")
    inputs = make_inputs(args.n, args.h, args.v, dtype, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{args.op} fwd+bwd  N={args.n} H={args.h} V={args.v} {dtype} on {name}")
    print(f"{'impl':<8} {'median ms':>10} {'peak MiB':>10} {'max |dW - first|':>18}")
    first = None
    for impl in impls:
        try:
            out = step(args.op, impl, inputs)
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. naive OOM at large shapes
            print(f"{impl:<8} {'-':>10} {'-':>10}   skipped: {str(e).splitlines()[0][:80]}")
            continue
        diff = "" if first is None else f"{(out[2].float() - first[2].float()).abs().max().item():18.3g}"
        first = first or out
        if device == "cuda":
            import triton.testing

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = triton.testing.do_bench(functools.partial(step, args.op, impl, inputs), quantiles=[0.5])
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"{impl:<8} {ms:10.2f} {peak:10.1f} {diff}")
        else:
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                step(args.op, impl, inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            print(f"{impl:<8} {statistics.median(times):10.2f} {'n/a':>10} {diff}")


if __name__ == "__main__":
    main()
