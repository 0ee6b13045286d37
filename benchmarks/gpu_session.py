"""One call on a lent GPU, worth having even if it is cut short: probe, the op tests on CUDA, the
benchmarks highest value first, the table of what Triton compiled, then more shapes while time remains.

    python3 benchmarks/gpu_session.py                 # on the GPU: everything within --budget-s (540 s)
    python3 benchmarks/gpu_session.py --dry-run       # the same steps on a CPU at small shapes (about a minute)
    python3 benchmarks/gpu_session.py --plot DIR      # here, afterwards: the plots of a session's bench.csv

Steps, in order (``session.log`` and the printed plan list them with their time limits):
  probe      the device, the driver and the package versions, in a child process;
  tests      ``python -m pytest tests/ops`` on CUDA (``-n 12`` with pytest-xdist), log in tests.log;
  policy     the TRRD policy loss fwd+bwd, bf16, H=4096, V=151936, N=8192 and 32768: ours, the GEMM
             speed of light (gemm-6nhv: the 6NHV matmuls alone), Cut Cross-Entropy's one-head CE,
             Liger's chunked GRPO loss, eager and torch.compile;
  logprobs   log-probs + entropy at the same shapes (ours, gemm-6nhv, CCE, Liger's FLCE, eager, compile);
  divergence the generalized JSD with a H_t=5120 teacher (ours, Liger's JSD, eager, compile);
  kernels    what Triton compiled in the benchmark processes: registers, spills, shared memory, MMA;
  more       N=16384 and 65536, then V=128256, op by op, while time remains.
Each benchmark step is a child process (a CUDA error ends only that step) with its own deadline: a
share of the time left, so a slow op cannot starve the ones after it. Within a step, a provider
is started at a shape only if its estimate fits: compile time (its first call, measured per
provider, paid again per shape by torch.compile) plus steady-state time scaled by N*V*(H+H_t) from
the largest shape it ran; cells not started get a ``skipped`` row that says why.

Output: ``$OUT/<UTC date>_<device slug>/`` when ``OUT`` is set (the device tool brings it back),
else ``benchmarks/results/gpu/<name>/``: summary.md, bench.csv, kernels.csv, session.json,
session.log, tests.log; each carries the device, the commit and the date, and is rewritten or
appended as results come, so a call killed at its limit keeps what it measured.

The commit is ``RLAD_COMMIT`` when set, else read with git: the lent machine's copy of the tree may
carry a .git of another commit (the first GPU session's files were stamped with it, and corrected).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gpu"
OURS = "rlad-triton"
GEMM = "gemm-6nhv"

PROVIDERS = {
    "policy": [OURS, GEMM, "cce-ce", "liger-grpo", "eager", "torch.compile"],
    "logprobs": [OURS, GEMM, "cce", "liger-flce", "eager", "torch.compile"],
    "divergence": [OURS, "liger-jsd", "eager", "torch.compile"],
}
# the shapes: the performance bar's (DESIGN.md section 5) first, then more while time remains
GPU = dict(H=4096, H_t=5120, dtype="bf16", seq_len=1024, core_V=151936, core_N=[8192, 32768], more_N=[16384, 65536],
           more_V=128256, more_V_N=[8192, 32768], tests=["tests/ops"], tests_s=150.0, budget_s=540.0,
           providers=PROVIDERS, first_guess_s={"torch.compile": 60.0, "default": 25.0})
DRY = dict(H=32, H_t=48, dtype="fp32", seq_len=16, core_V=256, core_N=[32, 48], more_N=[64], more_V=192,
           more_V_N=[32], tests=["tests/ops/test_op_errors.py", "-k", "targets_out_of_range or bad_temperature"],
           tests_s=120.0, budget_s=240.0, reps=1,
           providers={"policy": [OURS, GEMM, "cce-ce", "eager"], "logprobs": [OURS, GEMM, "cce", "eager"],
                      "divergence": [OURS, "eager"]},
           first_guess_s={"torch.compile": 20.0, "default": 10.0})
# shares of the time left that each benchmark step may use, among the steps still to run
SHARE = {"policy": 0.45, "logprobs": 0.25, "divergence": 0.30}
MORE_SHARE = {"policy": 0.5, "logprobs": 0.25, "divergence": 0.25}
RESERVE_S = 15.0  # kept back at the end for the kernels table and the summary
KERNEL_FIELDS = ["date", "commit", "device", "triton", "kernel", "dtype", "tiles", "variant", "warps", "stages",
                 "regs", "spill_bytes", "smem", "mma", "sources"]


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- probe
PROBE = r"""
import json, os, platform, sys
from importlib import metadata
out = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "packages": {}}
for name in ("torch", "triton", "numpy", "transformers", "liger-kernel", "cut-cross-entropy", "pytest", "pytest-xdist"):
    try:
        out["packages"][name] = metadata.version(name)
    except Exception:
        out["packages"][name] = None
import torch
out["cuda"] = torch.cuda.is_available()
out["cuda_runtime"] = torch.version.cuda
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
               sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
else:
    out["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
print(json.dumps(out))
"""


def probe(env: dict) -> dict:
    """The device and the versions, read in a child (the session process never touches CUDA)."""
    try:
        p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=120)
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        info = {"error": f"probe failed: {type(e).__name__}: {e}", "device": "unknown", "packages": {}}
    if info.get("cuda"):
        with contextlib.suppress(Exception):
            q = "driver_version,clocks.max.sm,clocks.max.mem,power.limit"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
    return info


# ----------------------------------------------------------------------------------- the session folder
class Out:
    def __init__(self, folder: Path, t0: float):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = t0
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.dir / name

    def log(self, line: str) -> None:
        text = f"[{time.monotonic() - self.t0:6.1f}s] {line}"
        with self._lock:
            print(text, flush=True)
            with self.path("session.log").open("a") as f:
                f.write(text + "\n")


def run_child(cmd: list[str], env: dict, deadline: float, out: Out, tag: str, log_file: Path | None = None) -> dict:
    """Run ``cmd`` in its own process group until it ends or ``deadline`` (monotonic) passes: then
    SIGINT, and SIGKILL 10 s later. Its output lines go to session.log (prefixed) or to ``log_file``."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    tail: list[str] = []

    def pump():
        sink = log_file.open("a") if log_file else None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-40]
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
                else:
                    out.log(f"{tag}: {line}")
        finally:
            if sink:
                sink.close()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = None
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        stopped = "time limit"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return dict(rc=proc.returncode, seconds=round(time.monotonic() - t, 1), stopped=stopped, tail=tail[-15:])


# ----------------------------------------------------------------------------------- the benchmark worker
def worker(spec: dict) -> int:
    """One benchmark step (one op, its shapes in order) in this process, through ``run.sweep`` with
    the step's deadline; the providers' history is what bench.csv already holds for this op. The
    kernels Triton compiled are dumped to spec['dump'] after each shape."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import torch

    import run as runmod
    from harness import Shape, env_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    op, csv_path = spec["op"], Path(spec["csv"])
    by_name = {p.name: p for p in runmod.PROVIDERS[op](spec["seq_len"])}
    H_t = spec["H_t"] if op == "divergence" else None
    shapes = [Shape(N=N, H=spec["H"], V=V, H_t=H_t, dtype=runmod.DTYPES[spec["dtype"]], seq_len=spec["seq_len"])
              for V, N in spec["shapes"]]
    history = [dict(provider=r["provider"], ms=float(r["ms_p50"]), first_s=float(r["first_s"] or 0),
                    size=runmod.shape_size(Shape(N=int(r["N"]), H=int(r["H"]), V=int(r["V"]), H_t=int(r["H_t"] or 0))))
               for r in read_csv(csv_path) if r["status"] == "ok" and r["op"] == op and r["mode"] == "full"]

    def dump():
        write_atomic(Path(spec["dump"]), json.dumps(kernel_records(), default=str))

    def after_shape(shape, inputs):
        if device.type == "cuda" and spec.get("profile") and spec["deadline"] - time.time() > 20:
            profile(op, by_name[OURS], shape, inputs)
        dump()

    try:
        runmod.sweep(op, shapes, [by_name[n] for n in spec["providers"]], device, env_info(device), modes=["full"],
                     reps=spec.get("reps", 3), csv_path=csv_path, deadline=spec["deadline"], history=history,
                     guess=spec["guess"], after_shape=after_shape)
    except KeyboardInterrupt:
        print("stopped at the step's time limit; the rows so far are in bench.csv", flush=True)
        return 130
    finally:
        dump()
    return 0


def profile(op: str, provider, shape, inputs: dict) -> None:
    """Where our op's fwd+bwd time goes at this shape: per CUDA kernel, over 3 calls (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    try:
        x = dict(inputs, hidden=inputs["hidden"].detach().requires_grad_(),
                 weight=inputs["weight"].detach().requires_grad_())
        fn = provider.make(x)
        fn().backward()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                x["hidden"].grad = x["weight"].grad = None
                fn().backward()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        events.sort(key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events) or 1.0
        print(f"  profile of {provider.name} at {shape.label} (3 calls, CUDA time per call):", flush=True)
        for e in events[:12]:
            print(f"    {e.device_time_total / 3e3:9.3f} ms {100 * e.device_time_total / total:5.1f}% "
                  f"x{e.count // 3:<3} {e.key[:90]}", flush=True)
    except Exception as e:  # noqa: BLE001 - a profile is a bonus, never a failure
        print(f"  profile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


# ----------------------------------------------------------------------------------- compiled kernels
def _plain(v):
    if hasattr(v, "_fields"):
        return {f: _plain(x) for f, x in zip(v._fields, v, strict=True)}
    if type(v).__name__ == "constexpr" and hasattr(v, "value"):
        return _plain(v.value)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def kernel_records() -> list[dict]:
    """Every kernel of ``rlad_kernels`` in this process's Triton JIT caches, as compiled for the GPU:
    registers and spills as the driver reports them, shared memory, warps, stages, tiles, MMA."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001
        return []
    fns = {}
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("rlad_kernels"):
            for obj in list(vars(mod).values()):
                fn = getattr(obj, "fn", obj) if not isinstance(obj, JITFunction) else obj
                if isinstance(fn, JITFunction):
                    fns[id(fn)] = fn
    out = []
    for fn in fns.values():
        for entry in list((getattr(fn, "device_caches", None) or {}).values()):
            cache = entry[0] if isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], dict) else {}
            for k in list(cache.values()):
                md = getattr(k, "metadata", None)
                if md is None:
                    continue
                named = {}
                for key, v in dict(getattr(getattr(k, "src", None), "constants", None) or {}).items():
                    if isinstance(key, tuple) and len(key) == 1 and key[0] < len(fn.arg_names):
                        key = fn.arg_names[key[0]]
                    if isinstance(key, str):
                        named[key] = _plain(v)
                sig = [str(t) for t in dict(getattr(getattr(k, "src", None), "signature", None) or {}).values()]
                dtype = next((d for d in ("bf16", "fp16", "fp32") if any(s == "*" + d for s in sig)), "")
                ptx = (getattr(k, "asm", None) or {}).get("ptx", "")
                mma = next((n for n, m in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"),
                                           ("mma.sync", "mma.sync")) if m in ptx), "none")
                n_spills = getattr(k, "n_spills", None)
                out.append(dict(kernel=fn.__name__, dtype=dtype,
                                tiles="x".join(str(named[t]) for t in ("BN", "BV", "BH") if t in named),
                                variant=" ".join(f"{a}={b}" for a, b in sorted(named.items())
                                                 if a not in ("BN", "BV", "BH", "DOT_PRECISION", "UPCAST")),
                                warps=getattr(md, "num_warps", None), stages=getattr(md, "num_stages", None),
                                regs=getattr(k, "n_regs", None),
                                spill_bytes=4 * n_spills if isinstance(n_spills, int) else None,
                                smem=getattr(md, "shared", None), mma=mma))
    return out


# ----------------------------------------------------------------------------------- tables
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


# ----------------------------------------------------------------------------------- the session
def plan(cfg: dict) -> list[dict]:
    """The benchmark steps in order: the three ops at the core shapes, then each op at more shapes
    (more N at the core V, then the other V). One child process per step: starting one costs seconds."""
    base = dict(H=cfg["H"], H_t=cfg["H_t"], dtype=cfg["dtype"], seq_len=cfg["seq_len"])
    steps = [dict(base, name=op, op=op, shapes=[(cfg["core_V"], n) for n in cfg["core_N"]], share=SHARE[op])
             for op in SHARE]
    more = [(cfg["core_V"], n) for n in cfg["more_N"]] + [(cfg["more_V"], n) for n in cfg["more_V_N"]]
    steps += [dict(base, name=f"more-{op}", op=op, shapes=more, share=MORE_SHARE[op]) for op in MORE_SHARE]
    return steps


class Session:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.cfg = DRY if a.dry_run else GPU
        self.t0 = time.monotonic()
        self.end = self.t0 + (a.budget_s or self.cfg["budget_s"])
        sys.path.insert(0, str(HERE))
        from harness import git_commit  # RLAD_COMMIT first: the lent machine's copy may carry a stale .git

        self.commit = git_commit()
        self.env = dict(os.environ, RLAD_COMMIT=self.commit, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH", "")]))
        if a.dry_run:
            self.env["TRITON_INTERPRET"] = "1"
        self.kernels: list[dict] = []
        self.dumps: list[Path] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def save(self) -> None:
        rows = read_csv(self.out.path("bench.csv"))
        write_atomic(self.out.path("session.json"), json.dumps(self.state, indent=1, default=str))
        write_atomic(self.out.path("summary.md"), summary(self.state, rows, self.kernels))

    def step(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.state["steps"].append(dict(name=name, status=status, seconds=round(seconds, 1), note=note))
        self.save()

    def start(self) -> None:
        info = probe(self.env)
        started = utc_now()
        name = f"{started:%Y-%m-%d}_{slug(str(info.get('device', 'unknown')))}"
        root = Path(self.a.out) if self.a.out else Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
        self.out = Out(root / name, self.t0)
        # the workers' kernel dumps live outside $OUT: the device tool brings back at most 8 files
        self.tmp = Path(tempfile.mkdtemp(prefix="rlad-gpu-session-"))
        argv = " ".join(sys.argv[1:])
        self.state = dict(name=name, commit=self.commit, started=started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          budget_s=self.end - self.t0, command=f"python3 benchmarks/gpu_session.py {argv}".strip(),
                          dry_run=self.a.dry_run, probe=info, steps=[], plan=[])
        self.out.log(f"session {name}: commit {self.commit}, budget {self.end - self.t0:.0f} s, "
                     f"folder {self.out.dir}")
        self.out.log(f"device {info.get('device')} | " + " | ".join(f"{k} {v}" for k, v in info["packages"].items())
                     + (f" | nvidia-smi {info['nvidia_smi']}" if info.get("nvidia_smi") else ""))
        if info.get("error"):
            self.out.log(f"probe: {info['error']}")
        self.step("probe", "error" if info.get("error") else "ok", time.monotonic() - self.t0, info.get("error", ""))

    def tests(self) -> None:
        cmd = [sys.executable, "-m", "pytest", *self.cfg["tests"], "-q", "-rfE", "-p", "no:cacheprovider"]
        if importlib.util.find_spec("xdist") is not None and not self.a.dry_run:
            cmd += ["-n", str(self.a.test_workers)]
        limit = min(self.cfg["tests_s"] if self.a.tests_s is None else self.a.tests_s, self.left() - 60)
        if limit <= 5:
            return self.step("tests", "skipped", 0, "no time left")
        log = self.out.path("tests.log")
        log.write_text(f"# {self.state['name']} commit {self.commit} {utc_now():%Y-%m-%dT%H:%MZ}: "
                       f"{' '.join(cmd[1:])} (limit {limit:.0f} s)\n")
        self.out.log(f"tests: {' '.join(cmd[2:])} (limit {limit:.0f} s) -> tests.log")
        res = run_child(cmd, self.env, time.monotonic() + limit, self.out, "tests", log_file=log)
        tail = [ln for ln in res["tail"] if ln.strip()]
        last = tail[-1] if tail else ""
        status = "stopped" if res["stopped"] else "ok" if res["rc"] == 0 else f"failed (exit {res['rc']})"
        self.out.log(f"tests: {status} in {res['seconds']} s: {last}")
        self.step("tests", status, res["seconds"], last.strip("= ")[:200])

    def bench(self, steps: list[dict]) -> None:
        for i, s in enumerate(steps):
            left = self.left() - RESERVE_S
            weight = sum(x["share"] for x in steps[i:])
            budget = left * s["share"] / weight
            if budget < 10:
                self.out.log(f"{s['name']}: not started ({max(left, 0):.0f} s left)")
                self.step(s["name"], "skipped", 0, f"{max(left, 0):.0f} s left")
                continue
            dump = self.tmp / f"kernels_{s['name']}.json"
            spec = dict(op=s["op"], shapes=s["shapes"], H=s["H"], H_t=s["H_t"], dtype=s["dtype"],
                        seq_len=s["seq_len"], reps=self.cfg.get("reps", 3), providers=self.cfg["providers"][s["op"]],
                        guess=self.cfg["first_guess_s"], deadline=time.time() + budget,
                        profile=s["name"] in SHARE,
                        csv=str(self.out.path("bench.csv")), dump=str(dump))
            self.out.log(f"{s['name']}: (V, N) {s['shapes']}: {', '.join(spec['providers'])} (limit {budget:.0f} s)")
            res = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], self.env,
                            time.monotonic() + budget + 20, self.out, s["name"])
            status = "stopped" if res["stopped"] else "ok" if res["rc"] == 0 else f"failed (exit {res['rc']})"
            note = "" if res["rc"] == 0 else " / ".join(res["tail"][-3:])[-300:]
            self.dumps.append(dump)
            self.absorb()
            self.step(s["name"], status, res["seconds"], note)

    def absorb(self) -> None:
        """Merge the workers' kernel dumps into kernels.csv (one row per distinct compiled kernel)."""
        seen: dict[tuple, dict] = {}
        for d in self.dumps:
            with contextlib.suppress(OSError, ValueError):
                for k in json.loads(d.read_text()):
                    key = tuple(str(k.get(f)) for f in KERNEL_FIELDS[4:-1])
                    rec = seen.setdefault(key, dict(k, sources=[]))
                    rec["sources"].append(d.stem.removeprefix("kernels_"))
        self.kernels = sorted(seen.values(), key=lambda k: (k["kernel"], k["dtype"], k["tiles"], k["variant"]))
        info = self.state["probe"]
        with self.out.path("kernels.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=KERNEL_FIELDS)
            w.writeheader()
            for k in self.kernels:
                w.writerow(dict({f: k.get(f, "") for f in KERNEL_FIELDS}, date=self.state["started"],
                                commit=self.commit, device=info.get("device"),
                                triton=info.get("packages", {}).get("triton"), sources=" ".join(k["sources"])))

    def run(self) -> int:
        self.start()
        steps = plan(self.cfg)
        self.state["plan"] = (["probe", "tests"] + [f"{s['name']}: (V, N) {s['shapes']}" for s in steps[:3]]
                              + ["kernels"] + [f"{s['name']}: (V, N) {s['shapes']}" for s in steps[3:]])
        self.out.log("plan: " + " | ".join(self.state["plan"]))
        self.tests()
        self.bench(steps[:3])
        self.absorb()
        self.step("kernels", "ok" if self.kernels else "empty", 0, f"{len(self.kernels)} compiled kernels")
        self.bench(steps[3:])
        self.save()
        self.out.log(f"done in {time.monotonic() - self.t0:.0f} s: {self.out.dir}")
        with contextlib.suppress(OSError):
            for d in self.dumps:
                d.unlink(missing_ok=True)
            self.tmp.rmdir()
        return 0


# ----------------------------------------------------------------------------------- plots
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on a CPU at small shapes (TRITON_INTERPRET)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole session (540; dry run 240)")
    ap.add_argument("--tests-s", type=float, default=None, help="limit of the tests step (150)")
    ap.add_argument("--test-workers", type=int, default=12, help="pytest-xdist workers of the tests step")
    ap.add_argument("--out", type=Path, default=None, help="parent folder of the session folder "
                    "(default: $OUT, else benchmarks/results/gpu)")
    ap.add_argument("--plot", type=Path, default=None, metavar="DIR", help="plot a session folder's bench.csv and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    if a.plot:
        for p in plot(a.plot):
            print(p)
        return 0
    if not a.dry_run and platform.system() != "Linux":
        ap.error("the GPU session runs on Linux (it starts its steps as process groups)")
    return Session(a).run()


if __name__ == "__main__":
    sys.exit(main())
