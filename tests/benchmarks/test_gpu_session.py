"""The one-command GPU session (benchmarks/gpu_session.py), on a CPU: the join of the CPU-side
compile predictions with the kernels Triton really compiled (a fake JIT cache, then a real one
built for sm_90 with a stand-in driver), Inductor's kernels, the summary tables, and the whole
orchestration in --dry-run mode with the files it writes."""

import csv
import json
import os
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_session as gs  # noqa: E402

Flags = namedtuple("Flags", ["HAS_CLAMP", "KD"])


class FakeJIT:
    """What the collector reads of a JITFunction: name, parameters, per-device caches."""

    def __init__(self, name, arg_names, constexpr_names, caches):
        self.__name__ = name
        self.arg_names = arg_names
        self.params = [SimpleNamespace(is_constexpr=a in constexpr_names) for a in arg_names]
        self.device_caches = caches


def fake_kernel(constants, signature, warps=8, stages=3, shared=73728, n_regs=None, n_spills=None, ptx="", key=""):
    return SimpleNamespace(
        metadata=SimpleNamespace(num_warps=warps, num_stages=stages, shared=shared, target=SimpleNamespace(arch=90),
                                 name="k"),
        src=SimpleNamespace(constants=constants, signature=signature, attrs={}),
        n_regs=n_regs, n_spills=n_spills, asm={"ptx": ptx}, hash=key, fake_key=key)


ARGS = ["x_ptr", "y_ptr", "N", "FLAGS", "SPLIT", "BN", "BV", "BH"]
SIG = {"x_ptr": "*bf16", "y_ptr": "*fp32", "N": "i32", "FLAGS": "constexpr", "SPLIT": "constexpr", "BN": "constexpr",
       "BV": "constexpr", "BH": "constexpr"}


def consts(split, clamp=True, bn=64):
    return {(3,): Flags(clamp, 2), (4,): split, (5,): bn, (6,): 128, (7,): 64, (2,): 1}  # (2,): N == 1, not declared


def pred(kernel="fwd_kernel", split=1, clamp=True, bn=64, warps=8, stages=3, dtype="bf16", regs=100, key="", **kw):
    return dict(kernel=kernel, arch=90, dtype=dtype, variant=f"v{split}", tiles=f"{bn}x128x64", warps=warps,
                stages=stages, key=key, regs=regs, spill_bytes=0, smem=73728, mma="wgmma", loads="cp.async",
                problems=[], calls=["bf16 call"],
                constexprs={"FLAGS": {"HAS_CLAMP": clamp, "KD": 2}, "SPLIT": split, "BN": bn, "BV": 128, "BH": 64},
                **kw)


@pytest.fixture
def no_report(monkeypatch):
    """The collector without gpu_compile_report (its own variant formatting, keys from the fake)."""
    monkeypatch.setattr(gs, "_report", lambda: None)


def test_kernel_records_read_a_fake_jit_cache(no_report):
    k1 = fake_kernel(consts(1), SIG, n_regs=120, n_spills=3, ptx="... wgmma.mma_async ... cp.async", key="K1")
    k2 = fake_kernel(consts(4), SIG, n_regs=90, n_spills=0, ptx="mma.sync", key="K2")
    in_flight = object()  # an async compile's future: no metadata, skipped
    fn = FakeJIT("fwd_kernel", ARGS, {"FLAGS", "SPLIT", "BN", "BV", "BH"},
                 {0: ({"a": k1, "b": k2, "c": in_flight}, {}, "target", "backend", "binder")})
    helper = FakeJIT("helper", ["x"], set(), {})  # a @triton.jit helper: never launched, nothing cached
    recs = gs.kernel_records([fn, helper], "tests", key_fn=lambda f, k, arch: k.fake_key)
    assert [r["key"] for r in recs] == ["K1", "K2"]
    r = recs[0]
    assert r["kernel"] == "fwd_kernel" and r["arch"] == 90 and r["warps"] == 8 and r["stages"] == 3
    assert r["constexprs"] == {"FLAGS": {"HAS_CLAMP": True, "KD": 2}, "SPLIT": 1, "BN": 64, "BV": 128, "BH": 64}
    assert r["regs"] == 120 and r["spill_bytes"] == 12 and r["regs_from"] == "driver"  # Triton's n_spills: 4-byte words
    assert r["dtype"] == "bf16" and r["tiles"] == "64x128x64" and r["mma"] == "wgmma" and r["loads"] == "cp.async"
    assert r["variant"] == "Flags(HAS_CLAMP,KD=2) SPLIT=1" and recs[1]["variant"] == "Flags(HAS_CLAMP,KD=2) SPLIT=4"
    assert recs[1]["mma"] == "mma.sync" and recs[1]["loads"] == "sync" and r["sources"] == ["tests"]


def test_join_rules(no_report):
    fn = FakeJIT("fwd_kernel", ARGS, {"FLAGS", "SPLIT", "BN", "BV", "BH"}, {0: ({
        "exact": fake_kernel(consts(1), SIG, n_regs=130, n_spills=0, key="K1"),
        "config": fake_kernel(consts(2), SIG, n_regs=110, n_spills=0, key="other-shape"),
        "warps": fake_kernel(consts(3), SIG, warps=4, n_regs=200, n_spills=8, key="K3w4"),
        "none": fake_kernel(consts(1, clamp=False), SIG, n_regs=99, n_spills=0, key="K9"),
    }, None)})
    actual = gs.kernel_records([fn], "tests", key_fn=lambda f, k, arch: k.fake_key)
    # the same kernel from the benchmarks: one row, both places
    actual += gs.kernel_records([fn], "bench policy V=128256", key_fn=lambda f, k, arch: k.fake_key)[:1]
    predicted = [pred(split=1, key="K1", regs=128), pred(split=2, dtype="fp16", regs=105, key="P2f16"),
                 pred(split=2, dtype="bf16", regs=107, key="P2bf16"), pred(split=3, regs=150, key="P3"),
                 pred(split=5, regs=77, key="P5"), pred(kernel="bwd_kernel", regs=60, key="B")]
    cache = [dict(pred(split=1, regs=126), triton="3.9.0"), dict(pred(split=1, regs=1, dtype="fp32"), triton="x")]
    rows = {(r["kernel"], r["variant"], r["match"]): r for r in gs.join(actual, predicted, cache)}
    exact = rows[("fwd_kernel", "Flags(HAS_CLAMP,KD=2) SPLIT=1", "exact")]
    assert exact["pred_regs"] == 128 and exact["regs"] == 130 and exact["d_regs"] == 2 and exact["d_smem"] == 0
    assert exact["where"] == "tests; bench policy V=128256"
    assert exact["cache_regs"] == 126 and exact["cache_triton"] == "3.9.0"  # same dtype's cache entry
    config = rows[("fwd_kernel", "Flags(HAS_CLAMP,KD=2) SPLIT=2", "config")]
    assert config["pred_regs"] == 107 and config["d_regs"] == 3  # the bf16 prediction over the fp16 one
    other = rows[("fwd_kernel", "Flags(HAS_CLAMP,KD=2) SPLIT=3", "constexprs")]
    assert other["warps"] == 4 and other["pred_regs"] == 150 and other["spill_bytes"] == 32
    nothing = rows[("fwd_kernel", "Flags(KD=2) SPLIT=1", "no prediction")]
    assert nothing.get("pred_regs") is None and "d_regs" not in nothing and nothing["regs"] == 99
    launched = [r for r in rows.values() if r["match"] != "predicted, not launched"]
    never = sorted((r["kernel"], r["pred_regs"]) for r in rows.values() if r["match"] == "predicted, not launched")
    assert len(launched) == 4 and never == [("bwd_kernel", 60), ("fwd_kernel", 77), ("fwd_kernel", 105)]
    md = "\n".join(gs.join_tables(list(rows.values())))
    assert "4 distinct compiled kernels (1 config, 1 constexprs, 1 exact, 1 no prediction); 3 predictions" in md
    assert "1 compiled kernels spill registers" in md and "Kernels the benchmarks ran:" in md


def test_inductor_rows_from_a_fake_autotuner():
    cfg = SimpleNamespace(kwargs={"XBLOCK": 1, "R0_BLOCK": 2048}, num_warps=16, num_stages=1)
    at = SimpleNamespace(fn=SimpleNamespace(__name__="triton_red_fused__log_softmax_0"), inductor_meta={},
                         size_hints={"x": 8192, "r0_": 131072}, heuristic_type="REDUCTION",
                         launchers=[SimpleNamespace(config=cfg, n_regs=40, n_spills=0, shared=64)])
    seen: set = set()
    rows = gs._autotuner_rows(at, seen, "bench policy V=128256", {"provider": "torch.compile"})
    assert rows == [dict(provider="torch.compile", kernel="triton_red_fused__log_softmax_0",
                         source="bench policy V=128256", heuristic="REDUCTION",
                         size_hints={"x": 8192, "r0_": 131072}, blocks={"XBLOCK": 1, "R0_BLOCK": 2048}, warps=16,
                         stages=1, regs=40, spill_bytes=0, smem=64, compiled=True)]
    assert id(at) in seen
    assert "XBLOCK=1, R0_BLOCK=2048" in "\n".join(gs.inductor_table(rows))
    broken = SimpleNamespace(fn=None, inductor_meta=None, size_hints=None, launchers=None, configs=None)
    assert [r["kernel"] for r in gs._autotuner_rows(broken, seen, "s", {})] == ["?"]  # a row, never an exception


def test_bench_table_ratios_and_latest():
    base = dict(H="4096", H_t="", dtype="bfloat16", ms_p20="", ms_p80="", note="")
    rows = [dict(base, op="logprobs", provider="rlad-triton", mode="full", N="8192", V="128256", ms_p50="",
                 tflops="", mem_inc_mib="", mem_peak_mib="", status="skipped", note="not run: time budget"),
            dict(base, op="logprobs", provider="rlad-triton", mode="full", N="8192", V="128256", ms_p50="2.0",
                 tflops="400", mem_inc_mib="30", mem_peak_mib="5000", status="ok"),
            dict(base, op="logprobs", provider="eager", mode="full", N="8192", V="128256", ms_p50="5.0",
                 tflops="160", mem_inc_mib="12000", mem_peak_mib="17000", status="ok"),
            dict(base, op="logprobs", provider="cce", mode="full", N="8192", V="128256", ms_p50="", tflops="",
                 mem_inc_mib="", mem_peak_mib="", status="unavailable", note="cut-cross-entropy not installed")]
    rows.append(dict(rows[0]))  # a later skipped row never hides a measured one
    assert gs.latest(rows)[("logprobs", "rlad-triton", "full", "8192", "128256")]["status"] == "ok"
    md = "\n".join(gs.bench_tables(rows, {"logprobs": ["rlad-triton", "eager", "cce"]}))
    assert "| 128256 | 8192 | full | **rlad-triton** | 2.000 | 400.0 | 1.00x | 30 | 5000 | ok |" in md
    assert "| 128256 | 8192 | full | eager | 5.000 | 160.0 | 2.50x | 12000 | 17000 | ok |" in md
    assert "unavailable: cut-cross-entropy not installed" in md


def test_run_sweep_budget_and_rows_per_provider(tmp_path):
    import run
    from harness import Shape, env_info

    S = lambda N: Shape(N=N, H=4096, V=128256)  # noqa: E731
    assert run.estimate_s([], S(8192), 7.0) == 7.0
    assert run.estimate_s([(S(8192), 40.0)], S(16384), 0) == 80.0  # all of it scaled: an overestimate
    assert run.estimate_s([(S(8192), 40.0), (S(16384), 50.0)], S(65536), 0) == pytest.approx(110.0)  # 30 s fixed

    ap = run.parser("logprobs", cuda=False)
    args = ap.parse_args(["--N", "16", "32", "--H", "16", "--V", "64", "--modes", "full", "--reps", "1",
                          "--providers", "eager", "rlad-torch", "--csv", str(tmp_path / "b.csv"), "--budget-s", "1000"])
    provs = run.select_providers("logprobs", args, ap)
    seen = []
    res = run.sweep("logprobs", args, provs, torch.device("cpu"), env_info(torch.device("cpu")),
                    on_provider=lambda shape, p, rows: seen.append((shape.N, p.name, len(read(tmp_path / "b.csv")))))
    assert [(N, name) for N, name, _ in seen] == [(16, "rlad-torch"), (16, "eager"), (32, "rlad-torch"), (32, "eager")]
    assert [n for *_, n in seen] == [1, 2, 3, 4]  # each provider's rows are in the CSV before the next one runs
    assert len(res["shape_s"]) == 2 and not res["not_started"]
    args.budget_s, args.first_estimate_s = 5.0, 60.0  # the first shape would not fit: nothing starts
    res = run.sweep("logprobs", args, provs, torch.device("cpu"), {}, None)
    assert [s.N for s in res["not_started"]] == [16, 32] and not res["rows"]


def read(path):
    return list(csv.DictReader(path.open())) if path.is_file() else []


# --------------------------------------------------------------------------- subprocesses
def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "RLAD_KERNEL_DUMP_DIR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


REAL = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, "benchmarks")
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
import gpu_session as gs
import rlad_kernels as rk
from rlad_kernels.ops.common import launch
from rlad_kernels.utils import dispatch

class Driver:  # Triton's JIT specializes and compiles for sm_90; launching is what it cannot do
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")

driver.set_active(Driver())
dispatch.triton_interpreting = lambda: True  # CPU tensors accepted, sm_90 tile configurations
launch.gpu_family = lambda device: 90
g = torch.Generator().manual_seed(0)
x = torch.empty(257, 256, dtype=torch.bfloat16).normal_(generator=g)
w = torch.empty(4096, 256, dtype=torch.bfloat16).normal_(generator=g)
y = torch.randint(0, 4096, (257,), generator=g)
try:
    rk.linear_logprobs(x, w, y, impl="triton")
except Exception as e:  # the first kernel is compiled into the JIT cache, then its launch fails
    print("launch:", type(e).__name__)
actual = gs.kernel_records(gs.jit_functions(), "probe")
for fn in gs.jit_functions():  # the report records only what is not compiled yet
    fn.device_caches.clear()
import gpu_compile_report as rep
rep.main(["--no-write", "--json", sys.argv[1], "--archs", "90", "--groups", "standard", "--dtypes", "bf16",
          "--calls", "bf16 logprobs", "--jobs", "1"])
predicted = json.loads(open(sys.argv[1]).read())["results"]
print("JOIN" + json.dumps(dict(actual=actual, join=gs.join(actual, predicted)), default=str))
"""


def test_real_jit_cache_joins_the_report_exactly(tmp_path):
    """A real kernel compiled for sm_90 by Triton's JIT into its device cache (a stand-in driver:
    compiled, not launched) is read by the collector and joined with gpu_compile_report's
    prediction of the same launch by compile key."""
    p = subprocess.run([sys.executable, "-c", REAL, str(tmp_path / "pred.json")], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.split("JOIN", 1)[1])
    (a,) = out["actual"]  # only the first kernel compiled before the launch failed
    assert a["kernel"] == "logprobs_fwd_kernel" and a["arch"] == 90 and a["dtype"] == "bf16"
    assert a["regs_from"] == "cubin" and a["regs"] > 0 and a["spill_bytes"] == 0 and a["mma"] == "wgmma"
    (row,) = [r for r in out["join"] if r["match"] != "predicted, not launched"]
    assert row["match"] == "exact", row
    assert row["regs"] == row["pred_regs"] and row["smem"] == row["pred_smem"] and row["d_regs"] == 0
    assert row["variant"] == "SPLIT=1" and row["tiles"] == "64x128x64"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU orchestration check; on a GPU the session itself runs")
def test_dry_run_session_end_to_end(tmp_path):
    out = tmp_path / "s1"
    cmd = [sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted(gs.FILES) and len(names) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    state = json.loads((out / "session.json").read_text())
    env = state["env"]
    dev, commit, date = env["device"], env["commit"], env["date"]
    assert dev.startswith("cpu") and commit not in ("", "unknown") and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:]+Z", date)
    # every file carries the device, the commit and the date
    for name in ("summary.md", "session.log", "tests.log"):
        text = (out / name).read_text()
        assert dev in text and commit in text and date in text, name
    bench = list(csv.DictReader((out / "bench.csv").open()))
    join = list(csv.DictReader((out / "compile_join.csv").open()))
    for rows in (bench, join):
        assert rows and all(r["device"] == dev and r["commit"] == commit and r["date"][:10] == date[:10] for r in rows)
    # parts
    assert state["parts"]["tests"]["status"] == "passed" and "passed" in state["parts"]["tests"]["detail"]
    assert state["parts"]["compile"]["status"] == "ok" and state["parts"]["bench"]["status"] == "done"
    # the grid: one row per planned cell; ours is unavailable on a CPU without the interpreter
    plan = state["plan"]
    cells = {(r["op"], r["provider"], r["mode"], r["N"], r["V"]): r["status"] for r in bench}
    want = {(op, p, m, str(N), str(V)) for op in plan["ops"] for p in plan["providers"][op] for m in plan["modes"]
            for N in plan["N"] for V in plan["V"]}
    assert set(cells) == want and len(bench) == len(want)
    assert {s for (op, prov, *_), s in cells.items() if prov == "rlad-triton"} == {"unavailable"}
    assert {s for (op, prov, *_), s in cells.items() if prov == "eager"} == {"ok"}
    # the compile part: the report's predictions, none launched (the interpreter compiles nothing)
    assert state["predicted"]["arch"] == 90 and state["predicted"]["results"]
    assert len(join) == len(state["predicted"]["results"])
    assert {r["match"] for r in join} == {"predicted, not launched"} and all(r["pred_regs"] for r in join)
    summary = (out / "summary.md").read_text()
    for head in ("## Benchmarks", "### policy", "### logprobs", "### divergence", "## Compile", "DRY RUN"):
        assert head in summary

    # resume: done cells are not run again; a V that does not fit in the budget is marked skipped
    out2 = tmp_path / "s2"
    cmd = [sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--resume", str(out), "--out", str(out2),
           "--parts", "bench", "--V", "512", "1024", "--budget-s", "21", "--reserve-s", "20"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # not every cell ran
    bench2 = list(csv.DictReader((out2 / "bench.csv").open()))
    assert bench2[:len(bench)] == bench
    new = bench2[len(bench):]
    assert new and {r["V"] for r in new} == {"1024"} and {r["status"] for r in new} == {"skipped"}
    assert all("time budget" in r["note"] for r in new)
    state2 = json.loads((out2 / "session.json").read_text())
    assert state2["name"] == out.name and len(state2["runs"]) == 2 and state2["predicted"]["results"]
    assert "Not run in this session" in (out2 / "summary.md").read_text()
