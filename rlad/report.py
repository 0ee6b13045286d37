"""Metrics as JSONL, the per-step log line, PNG plots, and a run's eval table and summary."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .evaluate import metric_names, with_se
from .rundir import atomic_path, write_atomic
from .signals import check_writer

# the wall-clock metrics of a step record (and eval_s of an eval record): seconds by phase (generate, the old /
# teacher / reference scoring, the update; rollout_s is the whole batch, step_s the whole step) and the throughput;
# the only values two runs of the same settings may differ in
WALL_CLOCK = ("tokens_per_s", "rollout_s", "step_s", "generate_s", "score_old_s", "score_teacher_s", "score_ref_s",
              "update_s", "eval_s")

# metric -> (log-line label, format); the log line shows those present, in this order
LOG_LINE = (
    ("reward", "reward", "{:.3f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("response_len", "len", "{:.1f}"),
    ("truncated_frac", "trunc", "{:.2f}"),
    ("groups_equal_frac", "eq-groups", "{:.2f}"),  # groups whose rewards are all equal: no advantage signal
    ("loss", "loss", "{:+.4f}"),
    ("nll", "nll", "{:.4f}"),
    ("clip_frac_pos", "clip+", "{:.3f}"),
    ("clip_frac_neg", "clip-", "{:.3f}"),
    ("ratio_mean", "ratio", "{:.3f}"),
    ("teacher_clamp_frac", "clamp", "{:.3f}"),
    ("teacher_clamp_hi", "clamp>", "{:.3f}"),
    ("teacher_clamp_lo", "clamp<", "{:.3f}"),
    ("teacher_gate_frac", "gated", "{:.3f}"),
    ("teacher_gap", "gap", "{:+.3f}"),
    ("entropy_mean", "ent", "{:.3f}"),
    ("kd_mean", "kd", "{:.4f}"),
    ("divergence", "div", "{:.4f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
)


def log_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step:>{len(str(total))}d}/{total}"]
    for key, label, fmt in LOG_LINE:
        if key in m and m[key] is not None and math.isfinite(m[key]):
            parts.append(f"{label} {fmt.format(m[key])}")
    if m.get("nan_skips"):
        parts.append(f"nan-skips {int(m['nan_skips'])}")
    if m.get("reward_errors"):
        parts.append(f"reward-errors {int(m['reward_errors'])}")
    return " | ".join(parts)


class MetricsLog:
    """Append-only JSONL, one record per line in step order; ``rewind(step)`` drops the records
    past a resumed checkpoint by truncating the file in place (no copy: it works on a full disk)."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        check_writer(str(self.path))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # reading a log never makes its folder
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e}: cannot append a record to {self.path}") from e

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
        return out

    def rewind(self, step: int) -> None:
        """Keep the records up to ``step``: cut the file at the first record past it, or at a last
        line a crash left without its newline."""
        if not self.path.is_file():
            return
        check_writer(str(self.path))
        keep = 0
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict) and record.get("step", 0) > step:
                    break
                keep += len(line)
        try:
            os.truncate(self.path, keep)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e}: cannot rewind {self.path} to step {step}") from e

    def reset(self) -> None:
        """Empty the log (a run that starts from step 0)."""
        if self.path.is_file():
            check_writer(str(self.path))
            os.truncate(self.path, 0)


PANELS = (
    ("reward / accuracy", ("reward", "accuracy", "groups_equal_frac")),
    ("held-out accuracy", ("eval/accuracy",)),
    ("loss", ("loss",)),
    ("clip fractions", ("clip_frac_pos", "clip_frac_neg", "teacher_clamp_hi", "teacher_clamp_lo",
                        "teacher_gate_frac")),
    ("entropy", ("entropy_mean",)),
    ("response length", ("response_len", "truncated_frac")),
    ("teacher", ("teacher_gap", "kd_mean", "divergence")),
    ("ratio", ("ratio_mean",)),
)


def plot(records: Sequence[dict], path, title: str = "") -> Path | None:
    """One PNG with a panel per metric group present in the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, keys in PANELS:
        series = {}
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r and r[k] is not None and math.isfinite(r[k])]
            if pts:
                series[k] = pts
        if series:
            panels.append((name, series))
    if not panels:
        return None
    cols = 2
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels, strict=False):  # a 2-column grid may have one more axis
        for k, pts in series.items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (a crash never leaves half a file), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    def cell(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def eval_table(first: dict | None, final: dict) -> str:
    """Markdown: each metric (all levels, then per level) at the start and the end, with standard
    errors, and the eval set's size."""
    levels = sorted(int(k[len("n/L"):]) for k in final if k.startswith("n/L"))
    rows = []
    for lv in [None, *levels]:
        suffix = "" if lv is None else f"/L{lv}"
        for name in metric_names(final):
            rows.append((name + suffix, int(final.get("n" + suffix, 0)), with_se(first, name, lv) if first else "n/a",
                         with_se(final, name, lv)))
    return markdown_table(["metric", "prompts", "start", "end"], rows)


def write_summary(cfg, held, log: MetricsLog, final: dict, state: dict, checkpoint, reward_errors: bool) -> dict:
    """A finished run's ``summary.json`` (settings, eval sets, the first and final evaluations,
    where the plots and the last checkpoint are), ``summary.md`` (the eval table) and
    ``curves.png``; the table and the paths are printed. ``held``: the run's ``heldout.HeldOut``."""
    out = Path(cfg.out_dir)
    records = log.records()
    plot_path = plot(records, out / "curves.png", title=f"{cfg.algo} on {cfg.task}")
    first = next((r for r in records if r.get("eval") and r["step"] == 0), None)
    start = {k[5:]: v for k, v in (first or {}).items() if k.startswith("eval/")}
    table = eval_table(start or None, final)
    summary = {"algo": cfg.algo, "task": cfg.task, "steps": cfg.steps, "nan_skips": state["nan_skips"],
               "eval_task": cfg.eval_task or cfg.task, "eval_sizes": {f"L{k}": v for k, v in held.sizes.items()},
               "train_rows_held_out": held.dropped_from_training,
               "final": final, "start": start,
               "plots": str(plot_path) if plot_path else None,
               "checkpoint": str(checkpoint)}
    if reward_errors:
        summary["reward_errors"] = state["reward_errors"]
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_atomic(out / "summary.md", f"# {cfg.algo} on {cfg.task}\n\n{table}\n")
    print(f"\n{table}\n\nmetrics: {log.path}\nplots: {plot_path}\ncheckpoint: {summary['checkpoint']}", flush=True)
    return summary
