"""The one-call GPU session (python -m benchmarks.gpu_session) on a CPU: its plan and per-provider time
estimates, the summary's ratios, a step whose deadline has passed, and the whole session in
--dry-run mode (the device command's arguments plus --dry-run), with the files it brings back."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run as runmod
from benchmarks.harness import Shape
from benchmarks.session_plan import DRY, GPU, PROVIDERS, plan
from benchmarks.session_report import bench_tables
from benchmarks.session_worker import worker

ROOT = Path(__file__).parents[2]

GUESS = {"torch.compile": 60.0, "default": 25.0}


def test_plan_puts_the_performance_bar_first():
    steps = plan(GPU)
    assert [s["name"] for s in steps[:3]] == ["policy", "logprobs", "divergence"]
    assert steps[0]["shapes"] == [(151936, 8192), (151936, 32768)]
    assert all(s["H"] == 4096 and s["dtype"] == "bf16" for s in steps) and steps[2]["H_t"] == 5120
    assert PROVIDERS["policy"][:4] == ["rlad-triton", "gemm-6nhv", "cce-ce", "liger-grpo"]
    more = steps[3]["shapes"]
    assert (151936, 65536) in more and (128256, 8192) in more


def test_estimates_scale_steady_state_time_and_add_compile_time_per_shape():
    size = runmod.shape_size(Shape(N=8192, H=4096, V=151936))
    assert size == 8192 * 151936 * 4096 and runmod.shape_size(Shape(N=2, H=3, V=5, H_t=7)) == 2 * 5 * 10
    hist = [dict(provider="rlad-triton", size=size, ms=40.0, first_s=12.0),
            dict(provider="torch.compile", size=size, ms=100.0, first_s=30.1)]
    # never ran: the first guess
    assert runmod.estimate_s(hist, "eager", 4 * size, GUESS) == 25.0
    # ours compiled once: 10 calls of the scaled time (4 x 40 ms) and a fixed half second
    assert runmod.estimate_s(hist, "rlad-triton", 4 * size, GUESS) == pytest.approx(10 * 0.160 + 0.5)
    # torch.compile compiles again per shape: its first call less one steady call, plus the calls
    assert runmod.estimate_s(hist, "torch.compile", 4 * size, GUESS) == pytest.approx(30.0 + 10 * 0.4 + 0.5)
    # the largest shape measured is the one scaled from
    hist.append(dict(provider="rlad-triton", size=4 * size, ms=100.0, first_s=0.2))
    assert runmod.estimate_s(hist, "rlad-triton", 8 * size, GUESS) == pytest.approx(10 * 0.2 + 0.5)


def _row(provider, ms, **kw):
    return dict(dict(op="policy", provider=provider, V="151936", N="8192", H="4096", H_t="", dtype="bfloat16",
                     status="ok", ms_p50=str(ms), tflops="1", mem_inc_mib="", mem_extra_mib="", first_s="1"), **kw)


def test_bench_table_ratios_are_to_ours_and_to_the_gemm():
    rows = [_row("rlad-triton", 30.0), _row("gemm-6nhv", 20.0), _row("eager", 90.0),
            _row("liger-grpo", "", status="error", note="RuntimeError: boom")]
    lines = bench_tables(rows)
    by = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in lines if ln.startswith("| ")}
    assert by["rlad-triton"][3:5] == ["1.00", "1.50"]
    assert by["eager"][3:5] == ["3.00", "4.50"]
    assert by["liger-grpo"][-1] == "error: RuntimeError: boom"


def test_a_step_past_its_deadline_writes_skipped_rows_and_makes_no_inputs(tmp_path):
    spec = dict(op="policy", shapes=[[256, 32]], H=32, H_t=0, dtype="fp32", seq_len=16, reps=1,
                providers=["rlad-torch", "eager"], guess=GUESS, history=[], deadline=time.time() - 1,
                csv=str(tmp_path / "bench.csv"), dump=str(tmp_path / "k.json"))
    assert worker(spec) == 0
    with (tmp_path / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["provider"], r["status"]) for r in rows] == [("rlad-torch", "skipped"), ("eager", "skipped")]
    assert all(r["note"].startswith("not started") and r["commit"] and r["device"] for r in rows)
    assert json.loads((tmp_path / "k.json").read_text()) == []


def test_dry_run_is_the_device_session_on_a_cpu(tmp_path):
    """The README's device command with --dry-run: every step in order, each file written, a row for
    every provider of every core cell, ours measured (Triton's interpreter), the GPU-only providers
    saying why they did not run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["summary.md", "bench.csv", "kernels.csv", "session.json", "session.log", "tests.log"])
    state = json.loads((folder / "session.json").read_text())
    names = [s["name"] for s in state["steps"]]
    assert names[:6] == ["probe", "tests", "policy", "logprobs", "divergence", "kernels"]
    assert state["steps"][1]["status"] == "ok" and "passed" in state["steps"][1]["note"]
    assert state["commit"] and state["probe"]["packages"]["torch"]
    with (folder / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    cfg = DRY
    for op in ("policy", "logprobs", "divergence"):
        for N in cfg["core_N"]:
            got = {r["provider"]: r for r in rows
                   if r["op"] == op and int(r["N"]) == N and int(r["V"]) == cfg["core_V"]}
            assert set(got) == set(cfg["providers"][op]), (op, N, sorted(got))
            assert all(r["status"] in ("ok", "skipped", "unavailable") for r in got.values()), got
    first = [r for r in rows if r["provider"] == "rlad-triton" and int(r["N"]) == cfg["core_N"][0]]
    assert first and all(r["status"] == "ok" and float(r["ms_p50"]) > 0 and float(r["first_s"]) > 0 for r in first)
    cce = [r for r in rows if r["provider"].startswith("cce")]
    assert cce and all(r["status"] == "unavailable" and r["note"] for r in cce)
    summary = (folder / "summary.md").read_text()
    assert "### policy, N=32, V=256" in summary and "| rlad-triton |" in summary
    assert "passed" in (folder / "tests.log").read_text()
