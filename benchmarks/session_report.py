"""The GPU session's results as tables and plots: ``summary.md`` (the steps, each shape's providers
against ours and the GEMM speed of light, the compiled kernels), the columns of ``kernels.csv``, and
the plots of a session folder's ``bench.csv``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .session_plan import GEMM, OURS, PROVIDERS

KERNEL_FIELDS = ["date", "commit", "device", "triton", "kernel", "dtype", "tiles", "variant", "warps", "stages",
                 "regs", "spill_bytes", "smem", "mma", "sources"]


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def bench_tables(rows: list[dict]) -> list[str]:
    """Per op and shape: every provider's median ms, TF/s at 6NHV, time over ours and over the GEMM
    speed of light, memory beyond the inputs (incremental, and beyond dX and dW), first-call seconds."""
    lines = []
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["op"], int(r["V"]), int(r["N"])), {})[r["provider"]] = r  # the latest row wins
    def order(cell):  # op by op; the larger vocabulary (the core shapes) first; N ascending
        (op, V, N) = cell[0]
        return (list(PROVIDERS).index(op) if op in PROVIDERS else 9, -V, N)

    for (op, V, N), provs in sorted(cells.items(), key=order):
        any_row = next(iter(provs.values()))
        lines += [f"### {op}, N={N}, V={V}, H={any_row['H']}" + (f", H_t={any_row['H_t']}" if any_row["H_t"] else "")
                  + f", {any_row['dtype']}, fwd+bwd", "",
                  "| provider | ms (p50) | TF/s (6NHV) | x ours | x GEMM | +MiB | MiB beyond dX,dW | first call s |"
                  " status |", "|---|---|---|---|---|---|---|---|---|"]
        ours = _num(provs.get(OURS, {}).get("ms_p50"))
        gemm = _num(provs.get(GEMM, {}).get("ms_p50"))
        order = PROVIDERS.get(op, []) + sorted(set(provs) - set(PROVIDERS.get(op, [])))
        for name in [p for p in order if p in provs]:
            r = provs[name]
            ms = _num(r.get("ms_p50"))
            if r["status"] != "ok" or ms is None:
                lines.append(f"| {name} | | | | | | | | {r['status']}: {r.get('note', '')[:90]} |")
                continue
            fmt = [f"{ms:.2f}", r["tflops"], f"{ms / ours:.2f}" if ours else "", f"{ms / gemm:.2f}" if gemm else "",
                   r.get("mem_inc_mib", ""), r.get("mem_extra_mib", ""), r.get("first_s", "")]
            lines.append(f"| {name} | " + " | ".join(str(x) for x in fmt) + " | ok |")
        lines.append("")
    return lines


def summary(state: dict, rows: list[dict], kernels: list[dict]) -> str:
    info = state["probe"]
    pk = info.get("packages", {})
    lines = [f"# GPU session {state['name']}", "",
             f"- device: {info.get('device')} (capability {info.get('capability')}, {info.get('sms')} SMs, "
             f"{info.get('mem_gib')} GiB; nvidia-smi: {info.get('nvidia_smi', 'n/a')})",
             f"- commit {state['commit']}, started {state['started']}, budget {state['budget_s']:.0f} s",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in pk.items()) + f", python {info.get('python')}",
             f"- command: `{state['command']}`", "", "## Steps", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for s in state["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s.get('note', '')} |")
    lines += ["", "## Benchmarks", "", "x GEMM: time over `gemm-6nhv` (the same shape's three matmuls alone); "
              "MiB beyond dX,dW: the incremental peak less the gradients every provider returns.", ""]
    lines += bench_tables(rows) or ["not measured", ""]
    lines += ["## What Triton compiled (rlad_kernels, benchmark processes)", ""]
    if kernels:
        lines += ["| kernel | dtype | tiles | warps | stages | regs | spill B | smem | mma | variant |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in kernels:
            lines.append(f"| {k['kernel']} | {k['dtype']} | {k['tiles']} | {k['warps']} | {k['stages']} | "
                         f"{k['regs']} | {k['spill_bytes']} | {k['smem']} | {k['mma']} | {k['variant'][:80]} |")
    else:
        lines.append("nothing (no benchmark step compiled a kernel: a CPU run, or no step got that far)")
    return "\n".join(lines) + "\n"


def plot(folder: Path) -> list[Path]:
    """From a session's bench.csv: per op and V, time vs N per provider, its ratio to the GEMM speed
    of light, and the memory beyond the inputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_csv(folder / "bench.csv") if r["status"] == "ok"]
    paths = []
    for op, V in sorted({(r["op"], r["V"]) for r in rows}):
        rs = [r for r in rows if r["op"] == op and r["V"] == V]
        gemm = {int(r["N"]): float(r["ms_p50"]) for r in rs if r["provider"] == GEMM}
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        for i, prov in enumerate(PROVIDERS.get(op, [])):
            if not any(r["provider"] == prov for r in rs):
                continue
            pts = sorted((int(r["N"]), float(r["ms_p50"]), _num(r.get("mem_inc_mib"))) for r in rs
                         if r["provider"] == prov)
            style = dict(marker="o", label=prov, lw=2.5 if prov == OURS else 1.2, color=f"C{i}")
            ax[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            rat = [(n, ms / gemm[n]) for n, ms, _ in pts if n in gemm]
            if rat and prov != GEMM:
                ax[1].plot([p[0] for p in rat], [p[1] for p in rat], **style)
            mem = [(n, m) for n, _, m in pts if m is not None and m > 0]
            if mem:
                ax[2].plot([p[0] for p in mem], [p[1] for p in mem], **style)
        ax[0].set(title=f"{op} fwd+bwd, V={V}: median time", xlabel="tokens N", ylabel="ms", xscale="log",
                  yscale="log")
        ax[1].set(title="time / GEMM speed of light (6NHV matmuls)", xlabel="tokens N", ylabel="x", xscale="log")
        ax[1].axhline(1.0, color="gray", lw=0.8)
        ax[2].set(title="incremental peak memory", xlabel="tokens N", ylabel="MiB", xscale="log", yscale="log")
        for a in ax:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.suptitle(f"{rs[0]['device']}, {rs[0]['dtype']}, commit {rs[0]['commit']}", fontsize=9)
        fig.tight_layout()
        p = folder / f"{op}_V{V}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths

