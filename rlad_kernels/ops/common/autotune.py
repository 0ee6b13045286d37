"""Opt-in autotuning of the tile configuration: ``RLAD_AUTOTUNE=1``.

Off by default: the per-GPU defaults of ``launch.DEFAULTS`` apply. With it on, the first Triton
call of an op for a new shape (op, GPU family, dtype, hidden and vocabulary sizes, the token
count rounded up to a power of two, the op's options) times the op's forward and backward
under each candidate of ``launch.AUTOTUNE_SPACE`` for that GPU family and dtype, on detached
copies of the call's own inputs, keeps the fastest, and runs that call and every later one
with that shape under it. The candidates were pruned ahead of time: each one compiles for its
architecture without spills (``python -m benchmarks.gpu_compile_report --groups autotune``; the test
suite checks it). Tuning a shape costs a few dozen runs of the op and, while it lasts, one
more weight-gradient-sized buffer.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch

from .launch import AUTOTUNE_SPACE, gpu_family, triton_config

ENV = "RLAD_AUTOTUNE"
_best: dict[tuple, dict] = {}


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def _bench(run: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=3, rep=10))


def shape_key(op: str, x: torch.Tensor, w: torch.Tensor, options: tuple) -> tuple:
    N = max(1, x.shape[0])
    return (op, gpu_family(x.device), x.dtype, 1 << math.ceil(math.log2(N)), x.shape[1], w.shape[0], options)


def tuned(key: tuple, run: Callable[[], None], bench: Callable[[Callable[[], None]], float] | None = None) -> dict:
    """The fastest candidate of the key's space (timed once per key; a candidate that fails to
    run on this GPU is skipped)."""
    if key not in _best:
        space = AUTOTUNE_SPACE[(key[1], key[2] == torch.float32)]
        times = []
        for cand in space:
            with triton_config(**cand):
                try:
                    times.append((bench or _bench)(run))
                except Exception:  # e.g. more shared memory than this GPU model has
                    times.append(math.inf)
        _best[key] = space[min(range(len(space)), key=times.__getitem__)]
    return _best[key]


@contextlib.contextmanager
def scope(impl: str, op: str, x: torch.Tensor, w: torch.Tensor, options: tuple, run: Callable[[], None]):
    """Run the body under the tuned configuration of this call's shape when autotuning is on and
    the op runs on Triton; otherwise under the defaults."""
    if impl != "triton" or not enabled():
        yield
        return
    with triton_config(**tuned(shape_key(op, x, w, options), run)):
        yield
