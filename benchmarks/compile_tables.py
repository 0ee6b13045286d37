"""The compile report's cache (``results/gpu_compile.json``: one full default run per Triton version)
and its tables (``gpu_compile.{csv,md}`` for the newest version, ``gpu_compile_triton<version>.*``
for each other)."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import subprocess
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks.gpu_compile_report"


FIELDS = ("kernel", "arch", "dtype", "variant", "tiles", "warps", "stages", "regs", "spill_bytes", "smem",
          "smem_limit", "mma", "loads", "problems")


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=commit.stdout.strip() or os.environ.get("RLAD_COMMIT", "unknown"), triton=triton.__version__,
                torch=torch.__version__)


def version_order(version: str) -> tuple:
    """Sort key of a Triton version string: its numbers, then the string (3.10.0 after 3.9.0)."""
    return tuple(int(n) for n in re.findall(r"\d+", version)), version


def load_cache(path: Path) -> tuple[dict, list[dict]]:
    """The cache file's runs (version -> environment and archs) and results, each result with its
    ``triton`` version; a file of the older one-run layout is read as that run's version."""
    if not path.is_file():
        return {}, []
    data = json.loads(path.read_text())
    if "versions" in data:
        return data["versions"], data["results"]
    env = {k: data[k] for k in ("date", "commit", "triton", "torch", "archs") if k in data}
    return {env["triton"]: env}, [dict(r, triton=r.get("triton", env["triton"])) for r in data["results"]]


def merge_cache(versions: dict, entries: list[dict], run: dict, results: list[dict]) -> tuple[dict, list[dict]]:
    """The cache after a full default run (``run``: its environment and archs): this run's results
    replace every entry of its Triton version (and any entry with the same key); the entries of
    other versions stay."""
    keys = {r["key"] for r in results}
    kept = [e for e in entries if e["triton"] != run["triton"] and e["key"] not in keys]
    versions = {v: env for v, env in versions.items() if v != run["triton"]} | {run["triton"]: run}
    versions = dict(sorted(versions.items(), key=lambda kv: version_order(kv[0])))
    return versions, kept + results


def table_paths(out: Path, version: str, newest: str) -> tuple[Path, Path]:
    stem = "gpu_compile" if version == newest else f"gpu_compile_triton{version}"
    return out / f"{stem}.csv", out / f"{stem}.md"


def write_table(results: list[dict], env: dict, paths: tuple[Path, Path]) -> tuple[Path, Path]:
    """The csv and markdown tables of ``results`` (dicts of ``Result`` fields), made under ``env``."""
    csv_path, md_path = paths
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(results, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["variant"]))
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("date", "commit", "triton") + FIELDS)
        for d in rows:
            w.writerow((env["date"], env["commit"], env["triton"])
                       + tuple("; ".join(d[k]) if k == "problems" else d[k] for k in FIELDS))
    bad = [r for r in rows if r["problems"]]
    lines = [f"# Triton launches compiled for GPUs without a GPU ({env['date']}, commit {env['commit']}, "
             f"triton {env['triton']})", "",
             f"Regenerate: `{COMMAND}` under this Triton version. Spill = register "
             "spill stack in bytes; smem = shared memory per block in bytes.", "",
             f"{len(rows)} compiles, {len(bad)} with problems.", "",
             "| kernel | sm | dtype | variant | tiles | warps | stages | regs | spill | smem | mma | loads "
             "| problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['variant']} | {r['tiles']} | {r['warps']} | "
                     f"{r['stages']} | {r['regs']} | {r['spill_bytes']} | {r['smem']} | {r['mma']} | {r['loads']} | "
                     f"{'; '.join(r['problems'])} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_tables(versions: dict, entries: list[dict], out: Path) -> list[Path]:
    """Every version's tables from the merged cache: the newest under the plain names."""
    newest = max(versions, key=version_order)
    stale = table_paths(out, newest, "")  # the newest version's numbered tables, from when it was not the newest
    for p in stale:
        p.unlink(missing_ok=True)
    written = []
    for version, env in versions.items():
        written += write_table([e for e in entries if e["triton"] == version], env,
                               table_paths(out, version, newest))
    return written

