"""Shared benchmark harness: realistic inputs, timing, memory, long-format CSV rows, plots.

Inputs are peaked like a trained LM's next-token distributions: the lm_head rows are scaled so
a row's softmax has an entropy of a few nats (plain randn hidden states and weights give a
nearly uniform distribution over the whole vocabulary, which flatters designs that skip
near-zero gradient tiles less and designs that do not skip them more), and the targets are
*sampled* from that softmax, as rollout tokens are. Per-token policy inputs: old log-probs
near the current ones, teacher log-probs further away, advantages from a standard normal.

Timing: ``triton.testing.do_bench`` (median and 20/80 quantiles) on CUDA; on CPU the same
quantiles over wall-clock repetitions. Memory on CUDA: peak allocated during the call, as an
increment over what was allocated before (the CCE way) and as an absolute peak (the Liger
way). Modes: ``fwd`` (the loss with grad enabled), ``bwd`` (``loss.backward(retain_graph=True)``
of an existing graph), ``full`` (both). ``agreement`` checks, before anything is timed, that the
providers computing the op's own loss give the same gradients (``run.py --check``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CSV_FIELDS = ["date", "commit", "device", "torch", "triton", "op", "provider", "mode", "N", "H", "V", "H_t",
              "dtype", "ms_p50", "ms_p20", "ms_p80", "tflops", "mem_inc_mib", "mem_peak_mib", "status", "note",
              "first_s", "mem_extra_mib"]
MODES = ("fwd", "bwd", "full")


class Unavailable(Exception):
    """A provider that cannot run here; the message says why (it is written to the CSV)."""


@dataclass
class Shape:
    N: int
    H: int
    V: int
    H_t: int | None = None
    dtype: torch.dtype = torch.bfloat16
    seq_len: int = 1024  # tokens per sequence, for providers that want [B, T, H]

    @property
    def label(self) -> str:
        return f"N={self.N} H={self.H} V={self.V}" + (f" H_t={self.H_t}" if self.H_t else "")


@dataclass
class Provider:
    name: str
    make: Callable[[dict[str, torch.Tensor]], Callable[[], torch.Tensor]]  # inputs -> closure returning a loss
    note: str = ""
    grads_in_forward: bool = False  # computes gradients inside its forward: no separate backward to time
    leaves: list[str] = field(default_factory=lambda: ["hidden", "weight"])
    backward: bool = True  # False: the closure is the whole fwd+bwd work (the GEMM speed of light), timed as is
    exact: bool = False  # computes the op's own loss (ours, eager, compiled): its gradients are comparable to ours


def git_commit() -> str:
    """``RLAD_COMMIT`` when set (a lent GPU machine's copy of the tree may carry a stale .git), else
    the checkout's short commit, else "unknown"."""
    if os.environ.get("RLAD_COMMIT", "").strip():
        return os.environ["RLAD_COMMIT"].strip()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def env_info(device: torch.device) -> dict[str, str]:
    commit = git_commit()
    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), "commit": commit,
            "device": name, "torch": torch.__version__, "triton": tv}


def command_line(module: str, argv=None) -> str:
    """How a benchmark was run: ``python -m benchmarks.<module>`` and its arguments (``argv``, else
    the process's own)."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def write_report(out, name: str, title: str, env: dict[str, str], command: str, body: list[str], *,
                 threads: int | None = None) -> str:
    """``<out>/<name>.md`` (printed too): ``title``, the machine it ran on (``env_info``: device,
    torch, commit, date; the thread count) and ``command``, then the ``body`` lines. Returns the text."""
    machine = f"- machine: {env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}"
    text = "\n".join([f"# {title}", "", machine + (f"; {threads} thread(s)" if threads else ""),
                      f"- command: `{command}`", *body]) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    print(text, flush=True)
    return text


def _peaked_weight(V: int, H: int, gen: torch.Generator, dtype: torch.dtype, spread: float = 8.0) -> torch.Tensor:
    w = torch.randn(V, H, generator=gen, device=gen.device)
    return w.mul_(spread / math.sqrt(H)).to(dtype)


@torch.no_grad()
def _sample_targets(hidden: torch.Tensor, weight: torch.Tensor, gen: torch.Generator, chunk: int = 4096):
    """One token per row sampled from softmax(hidden @ weight.T), on the inputs' device (a GPU
    samples 32k x 152k in well under a second; the CPU takes seconds per 1k rows)."""
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk):
        p = torch.softmax(hidden[i:i + chunk].float() @ weight.float().T, dim=-1)
        out[i:i + chunk] = torch.multinomial(p, 1, generator=gen)[:, 0]
        del p
    return out


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every input made on ``device`` from a generator there (no host round trip)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = shape.dtype

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    inputs = {"hidden": randn(shape.N, shape.H).to(dt), "weight": _peaked_weight(shape.V, shape.H, gen, dt)}
    inputs["targets"] = _sample_targets(inputs["hidden"], inputs["weight"], gen)
    inputs["advantages"] = randn(shape.N)
    inputs["old_logp"] = -1.0 + 0.1 * randn(shape.N)
    inputs["teacher_logp"] = -1.0 + randn(shape.N)
    if shape.H_t:
        inputs["teacher_hidden"] = randn(shape.N, shape.H_t).to(dt)
        inputs["teacher_weight"] = _peaked_weight(shape.V, shape.H_t, gen, dt)
    return inputs


def _quantiles(fn: Callable[[], None], device: torch.device, reps: int, grad_to_none=None):
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
        return p50, p20, p80
    times = []
    fn()  # warm-up
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    # inclusive: within the measured range (the default extrapolates below zero for a few samples)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def flops(op: str, shape: Shape, mode: str) -> float:
    """FLOPs the numbers are normalized to: the GEMM work of the op, 2NHV forward and 4NHV
    backward (6NHV for fwd+bwd), so designs that recompute pay visibly."""
    fwd = 2 * shape.N * shape.H * shape.V
    bwd = 4 * shape.N * shape.H * shape.V
    if op == "divergence" and shape.H_t:
        fwd += 2 * shape.N * shape.H_t * shape.V  # the teacher's logits are part of the forward
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def fwd_bwd(provider: Provider, closure: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One forward and backward of a provider's closure (the closure alone when it is the whole work)."""
    if not provider.backward:
        return closure
    return lambda: closure().backward()


def gradients(provider: Provider, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients of a provider's leaves (float32) after one forward and backward of its closure."""
    leaves = {name: inputs[name].detach().requires_grad_() for name in provider.leaves}
    fwd_bwd(provider, provider.make(dict(inputs, **leaves)))()
    return {name: t.grad.float() for name, t in leaves.items()}


def agreement(providers: Iterable[Provider], inputs: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(provider, what it gave) for every provider that computes the op's own loss (``exact``): the
    largest absolute difference of each gradient from the first one's that ran, or why it did not run."""
    out, first = [], None
    for p in providers:
        if not p.exact:
            continue
        try:
            grads = gradients(p, inputs)
        except Unavailable as e:
            out.append((p.name, f"unavailable: {e}"))
            continue
        except Exception as e:  # noqa: BLE001 - reported like a provider's failure in a sweep
            out.append((p.name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        if first is None:
            first = (p.name, grads)
            out.append((p.name, "the reference"))
            continue
        diffs = [f"max |d{k} - {first[0]}| {(g - first[1][k]).abs().max().item():.3g}" for k, g in grads.items()]
        out.append((p.name, ", ".join(diffs)))
    return out


def row_base(op: str, provider: str, shape: Shape, note: str = "") -> dict:
    """The CSV fields that name a cell: op, provider, shape, dtype."""
    return dict(op=op, provider=provider, N=shape.N, H=shape.H, V=shape.V, H_t=shape.H_t or "",
                dtype=str(shape.dtype).replace("torch.", ""), note=note)


def run(op: str, provider: Provider, shape: Shape, inputs: dict[str, torch.Tensor], modes: Iterable[str],
        device: torch.device, reps: int = 5) -> list[dict]:
    """Rows for one provider at one shape; a provider that cannot run yields rows that say why."""
    rows = []
    base = row_base(op, provider.name, shape, provider.note)
    leaves = []
    for name in provider.leaves:
        t = inputs[name].detach().requires_grad_()
        inputs = dict(inputs, **{name: t})
        leaves.append(t)
    try:
        closure = provider.make(inputs)
    except Unavailable as e:
        return [dict(base, mode=m, status="unavailable", note=str(e)) for m in modes]
    grad_mib = sum(t.numel() * t.element_size() for t in leaves) / 2**20
    for mode in modes:
        row = dict(base, mode=mode)
        if mode == "bwd" and provider.grads_in_forward:
            rows.append(dict(row, status="n/a", note="gradients are computed in the forward; see fwd and full"))
            continue
        if mode != "full" and not provider.backward:
            rows.append(dict(row, status="n/a", note="times fwd+bwd as one piece of work; see full"))
            continue
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            if mode == "fwd":
                fn = closure
            elif mode == "bwd":
                fn = functools.partial(closure().backward, retain_graph=True)
            else:
                fn = fwd_bwd(provider, closure)
            t0 = time.perf_counter()
            fn()  # compile / warm up outside the measurement; its time is first_s
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["first_s"] = round(time.perf_counter() - t0, 3)
            if device.type == "cuda":
                for t in leaves:  # the measured call allocates dX and dW itself
                    t.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
                row["mem_inc_mib"] = round((peak - before) / 2**20, 1)
                row["mem_peak_mib"] = round(peak / 2**20, 1)
                if mode == "full":  # beyond the gradients of the leaves (dX, dW), which any provider returns
                    row["mem_extra_mib"] = round((peak - before) / 2**20 - grad_mib, 1)
            p50, p20, p80 = _quantiles(fn, device, reps, grad_to_none=leaves)
            row.update(ms_p50=round(p50, 3), ms_p20=round(p20, 3), ms_p80=round(p80, 3),
                       tflops=float(f"{flops(op, shape, mode) / (p50 * 1e-3) / 1e12:.4g}"), status="ok")
        except Unavailable as e:
            row.update(status="unavailable", note=str(e))
        except torch.OutOfMemoryError as e:  # eager providers at large N
            row.update(status="oom", note=str(e).splitlines()[0][:120])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a provider's failure is a result, not a crash of the sweep
            row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        finally:
            for t in leaves:
                t.grad = None
        rows.append(row)
    return rows


def append_csv(rows: list[dict], env: dict[str, str], path: Path = RESULTS / "bench.csv") -> Path:
    """Append rows; a file written with an older column list is rewritten with the current one first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != CSV_FIELDS:
            with path.open(newline="") as f:
                old = list(csv.DictReader(f))
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, env.get(k, "")) for k in CSV_FIELDS})
    return path


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r.get("status") == "ok":
            mem = f"{r['mem_inc_mib']:>9} MiB" if "mem_inc_mib" in r else ""
            print(f"  {r['provider']:<22} {r['mode']:<5} {r['ms_p50']:>10.2f} ms  {r['tflops']:>7.1f} TF/s {mem}"
                  f"  (first call {r['first_s']:.1f} s)", flush=True)
        else:
            print(f"  {r['provider']:<22} {r['mode']:<5} {r['status']}: {r.get('note', '')}", flush=True)


def plot(csv_path: Path = RESULTS / "bench.csv", out_dir: Path = RESULTS) -> list[Path]:
    """Time and incremental memory vs N, one line per provider, one figure per (op, V, mode, device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["V"], r["mode"], r["device"]), []).append(r)
    paths = []
    for (op, V, mode, dev), rs in sorted(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for prov in sorted({r["provider"] for r in rs}):
            pts = sorted((int(r["N"]), float(r["ms_p50"]), r["mem_inc_mib"]) for r in rs if r["provider"] == prov)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            mem = [(p[0], float(p[2])) for p in pts if p[2] not in ("", None)]
            if mem:
                axes[1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=prov)
        axes[0].set(title=f"{op} {mode}: time", xlabel="tokens N", ylabel="ms (median)", xscale="log", yscale="log")
        axes[1].set(title="incremental peak memory", xlabel="tokens N", ylabel="MiB", xscale="log", yscale="log")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(f"V={V} on {dev}", fontsize=9)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() else "_" for c in dev)[:40]
        p = out_dir / f"{op}_V{V}_{mode}_{safe}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths
