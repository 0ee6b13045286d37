"""One command for a lent GPU: the tests, the compile table against its predictions, the benchmark grid.

    python -m benchmarks.gpu_session                             # everything, within --budget-s (540 s)
    python -m benchmarks.gpu_session --parts tests compile bench --V 128256
    python -m benchmarks.gpu_session --parts bench --resume benchmarks/results/gpu/<name>
    python -m benchmarks.gpu_session --dry-run --out /tmp/s      # the same orchestration on a CPU, small

Parts (``--parts``, run in this order; the compile prediction runs in the background during the tests):
  compile  ``gpu_compile_report.py --no-write --json`` for the GPU's architecture: what the CPU-side
           report predicts for every launch (registers, spill stack, shared memory, MMA, loads);
  tests    ``python -m pytest tests -q`` on the GPU, its output kept in ``tests.log``;
  bench    the performance-bar grid through ``run.py`` (ops x V x N x providers, fwd+bwd by default),
           one worker process per (op, V), each shape started only if its estimated time fits.
After the tests and after each benchmark worker, what Triton really compiled in those processes (the
JIT's per-device kernel cache of every ``@triton.jit`` kernel of ``rlad_kernels``: registers and
spills as the driver reports them, shared memory, MMA instruction, warps, stages, constexprs) is
joined with the prediction by compile key, else by kernel name and constexprs; the Triton kernels
that ``torch.compile`` (Inductor) generated for the eager baselines are listed too (best effort).

Output, one folder ``<UTC date>_<device slug>`` (under ``$OUT`` when set, and copied to
``benchmarks/results/gpu/``), six files (the device tool brings back at most 8), each carrying the
device, the commit and the date:
  summary.md        the headline tables (per op and shape: every provider's median ms, TFLOP/s,
                    memory and its ratio to ours), the compile join, Inductor's kernels, what did not run;
  bench.csv         ``harness.CSV_FIELDS`` rows as measured, plus ``skipped`` rows for cells not run;
  compile_join.csv  one row per compiled kernel (and per prediction never launched);
  session.json      everything machine-readable (environment, plan, parts, predictions, kernels, join);
  session.log       the progress lines; tests.log the pytest output.
Every file is rewritten or appended as results come, so a call killed at its time limit keeps what it
measured. ``--resume DIR`` continues a folder brought back from an earlier call: cells already
measured are skipped, kernels and predictions are kept, and the folder keeps its name.

The commit is read with git, else from ``RLAD_COMMIT`` (a lent machine's copy of the tree has no
.git): pass ``RLAD_COMMIT=$(git rev-parse --short HEAD)`` expanded here, in the command string.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict, deque
from pathlib import Path
from types import SimpleNamespace

# Only the standard library at module level: pytest loads this module as a plugin
# (``-p gpu_session``, benchmarks/ on PYTHONPATH) before tests/conftest.py sets TRITON_INTERPRET.
# Children are started by file path or by this top-level name, never as ``benchmarks.gpu_session``:
# a regular package named ``benchmarks`` installed elsewhere would shadow that namespace package.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gpu"
DUMP_ENV = "RLAD_KERNEL_DUMP_DIR"

OPS = ("policy", "logprobs", "divergence")
# the providers of the performance bar (DESIGN.md section 5): ours (Triton), eager, torch.compile,
# Liger-Kernel, Cut Cross-Entropy where it computes the op
SESSION_PROVIDERS = {
    "policy": ["rlad-triton", "eager", "torch.compile", "liger-grpo", "liger-trrd-noclamp"],
    "logprobs": ["rlad-triton", "eager", "torch.compile", "cce", "liger-flce"],
    "divergence": ["rlad-triton", "eager", "torch.compile", "liger-jsd"],
}
OURS = "rlad-triton"
GRID = dict(V=[128256, 151936], N=[8192, 16384, 32768, 65536], H=4096, H_t=5120, dtype="bf16", modes=["full"],
            reps=5, seq_len=1024, budget_s=540.0, tests_timeout_s=300.0, pytest_args="tests -q",
            compile_groups=["standard", "epilogue"], compile_dtypes=None, compile_calls=None, compile_arch=None)
# --dry-run: the orchestration end to end on a CPU in well under a minute
DRY = dict(V=[512], N=[64], H=64, H_t=80, dtype="fp32", modes=["full"], reps=2, seq_len=32, budget_s=100.0,
           tests_timeout_s=60.0, pytest_args="tests/benchmarks/test_benchmark_harness.py -q",
           compile_groups=["standard"], compile_dtypes=["bf16"], compile_calls=["bf16 logprobs", "bf16 divergence jsd"],
           compile_arch=90, providers=["rlad-triton", "rlad-torch", "eager", "cce", "liger-flce"])
FILES = ("summary.md", "bench.csv", "compile_join.csv", "session.json", "session.log", "tests.log")
JOIN_FIELDS = ["date", "commit", "device", "kernel", "dtype", "variant", "tiles", "warps", "stages", "match", "where",
               "arch", "regs", "spill_bytes", "smem", "mma", "loads", "regs_from",
               "pred_arch", "pred_regs", "pred_spill_bytes", "pred_smem", "pred_mma", "pred_loads", "pred_problems",
               "d_regs", "d_smem", "cache_triton", "cache_regs", "cache_spill_bytes", "cache_smem", "pred_calls"]


# ----------------------------------------------------------------------------------- environment
def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def git_commit() -> tuple[str, str]:
    """(short commit, where it came from): git, else RLAD_COMMIT, else unknown."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return out, "git"
    env = os.environ.get("RLAD_COMMIT", "").strip()
    return (env, "RLAD_COMMIT") if env else ("unknown", "none")


def fingerprint() -> str:
    """sha256 (12 hex) of the Python sources of rlad_kernels/, rlad/, benchmarks/ and tests/: the same
    here and on the lent machine when the tree that travelled is the tree committed."""
    h = hashlib.sha256()
    for top in ("rlad_kernels", "rlad", "benchmarks", "tests"):
        for p in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" in p.parts:
                continue
            h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:48] or "device"


PROBE = r"""
import json, os, platform
out = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
try:
    import torch
    out.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda=torch.cuda.is_available())
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
from importlib import metadata
out["packages"] = {}
for name in ("triton", "liger-kernel", "cut-cross-entropy", "transformers", "pytest", "pytest-xdist"):
    try:
        out["packages"][name] = metadata.version(name)
    except Exception:
        out["packages"][name] = None
try:  # the provider names of each op, as benchmarks/providers.py defines them
    import sys
    sys.path.insert(0, "benchmarks")
    from providers import provider_names
    out["providers"] = {op: list(provider_names(op)) for op in ("policy", "logprobs", "divergence")}
except Exception as e:
    out["providers_error"] = f"{type(e).__name__}: {e}"
try:  # the architectures the compile report knows
    import gpu_compile_report
    out["report_archs"] = sorted(gpu_compile_report.ARCHS)
except Exception as e:
    out["report_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def probe(env: dict) -> dict:
    """The device and the packages, read in a child process (this one never initializes CUDA)."""
    try:
        p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=180)
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        info = {"error": f"probe failed: {type(e).__name__}: {e}", "device": "unknown", "packages": {}}
    if info.get("cuda"):
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    return info


# ----------------------------------------------------------------------------------- output
class Out:
    """The session folder: ``dirs[0]`` is written as results come; the others get copies at each
    checkpoint. ``log`` prints a progress line and appends it to session.log."""

    def __init__(self, dirs: list[Path], t0: float, deadline: float):
        self.dirs = []
        for d in dirs:
            if d.resolve() not in [x.resolve() for x in self.dirs]:
                self.dirs.append(d)
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.t0, self.deadline = t0, deadline
        self._lock = threading.Lock()

    @property
    def primary(self) -> Path:
        return self.dirs[0]

    def path(self, name: str) -> Path:
        return self.primary / name

    def write(self, name: str, text: str) -> None:
        tmp = self.primary / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.primary / name)

    def append(self, name: str, text: str) -> None:
        with self._lock, (self.primary / name).open("a") as f:
            f.write(text)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        el = time.monotonic() - self.t0
        line = f"[{int(el) // 60:02d}:{int(el) % 60:02d} | {max(self.left(), 0):4.0f} s left] {msg}"
        print(line, flush=True)
        self.append("session.log", line + "\n")

    def sync(self) -> None:
        for d in self.dirs[1:]:
            for name in FILES:
                src = self.primary / name
                if src.is_file():
                    with contextlib.suppress(OSError):
                        shutil.copyfile(src, d / name)


RUNNING: set = set()  # the Jobs not yet waited for


class Job:
    """A child process in its own process group, its output streamed line by line to a log file
    (and to stdout when ``echo``); stopped with SIGINT, then SIGKILL, at its time limit."""

    def __init__(self, cmd: list[str], env: dict, log: Path, echo: bool = True, header: str = ""):
        self.cmd, self.log, self.echo = cmd, log, echo
        self.tail: deque[str] = deque(maxlen=60)
        self.t0 = time.monotonic()
        self.killed = False
        extra = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self._f = log.open("a")
        if header:
            self._f.write(header)
            self._f.flush()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env, cwd=ROOT, errors="replace", **extra)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        RUNNING.add(self)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._f.write(line)
            self._f.flush()
            self.tail.append(line.rstrip("\n"))
            if self.echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    def _signal(self, sig) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.stop()
        self._reader.join(timeout=10)
        self._f.close()
        RUNNING.discard(self)
        return self.proc.returncode

    def stop(self, grace: float = 20.0) -> None:
        self.killed = True
        self._signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def seconds(self) -> float:
        return round(time.monotonic() - self.t0, 1)


# ----------------------------------------------------------------------------------- compiled kernels
@contextlib.contextmanager
def _keep_env(*names):
    saved = {n: os.environ.get(n) for n in names}
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _report():
    """benchmarks/gpu_compile_report.py as a module (its import sets TRITON_INTERPRET=0 for itself:
    undone here, so importing it from a test process changes nothing else), or None."""
    if "gpu_compile_report" in sys.modules:
        return sys.modules["gpu_compile_report"]
    try:
        with _keep_env("TRITON_INTERPRET"):
            if str(HERE) not in sys.path:
                sys.path.insert(0, str(HERE))
            import gpu_compile_report
        return gpu_compile_report
    except Exception:  # noqa: BLE001 - the join falls back to constexprs
        return None


def _plain(v):
    """A constexpr as the compile report writes it: named tuples as dicts, JSON types."""
    if hasattr(v, "_fields"):
        return {f: _plain(x) for f, x in zip(v._fields, v, strict=True)}
    if type(v).__name__ == "constexpr" and hasattr(v, "value"):
        return _plain(v.value)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def canon(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def jit_functions(prefix: str = "rlad_kernels") -> list:
    """Every ``@triton.jit`` function defined in the loaded modules of ``prefix`` (through autotune
    or heuristics wrappers); helpers that are never launched have empty caches."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001
        return []
    found = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == prefix or name.startswith(prefix + ".")):
            continue
        for obj in list(vars(mod).values()):
            fn = obj
            for _ in range(4):
                if isinstance(fn, JITFunction):
                    break
                try:
                    fn = getattr(fn, "fn", None)
                except Exception:  # noqa: BLE001
                    fn = None
                if fn is None:
                    break
            if isinstance(fn, JITFunction):
                found[id(fn)] = fn
    return sorted(found.values(), key=lambda f: f.__name__)


def _flat(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from _flat(x)


def _sig_dtype(signature: dict) -> str:
    """The float type of a kernel's pointers (16-bit first): the launch's input dtype."""
    ptrs = [t[1:] for t in _flat(list(signature.values())) if t.startswith("*")]
    for dt in ("bf16", "fp16", "fp32"):
        if dt in ptrs:
            return dt
    return ptrs[0] if ptrs else ""


def _mma(ptx: str) -> str:
    for name, marker in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")):
        if marker in ptx:
            return name
    return "none"


def cubin_usage(cubin: bytes) -> tuple[int, int] | None:
    """(registers, stack bytes) of a cubin, read with the cuobjdump inside the triton wheel."""
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                                   timeout=60).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        return (int(m.group(1)), int(m.group(2))) if m else None
    except Exception:  # noqa: BLE001
        return None


def default_key(fn, kernel, arch) -> str:
    """The compile report's key of a compiled kernel (``gpu_compile_report.compile_key``)."""
    rep = _report()
    src = kernel.src
    ns = SimpleNamespace(fn=fn, signature=src.signature, constexprs=src.constants, attrs=src.attrs,
                         num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages)
    return rep.compile_key(ns, arch) if rep is not None else ""


def _names(fn, kernel, constants: dict) -> tuple[dict, str, str]:
    """(declared constexprs by name, variant, tiles) as the compile report formats them."""
    named = {}
    for p, v in constants.items():
        if isinstance(p, str):
            named[p] = v
        elif isinstance(p, tuple) and len(p) == 1 and getattr(fn.params[p[0]], "is_constexpr", False):
            named[fn.arg_names[p[0]]] = v
    variant = tiles = None
    rep = _report()
    if rep is not None:
        try:
            lc = rep.Launch(fn, kernel.src.signature, constants, kernel.src.attrs, kernel.metadata.num_warps,
                            kernel.metadata.num_stages, "")
            variant, tiles = lc.variant(), lc.tiles()
        except Exception:  # noqa: BLE001
            pass
    if variant is None:
        variant, tiles = _variant(named), "x".join(str(named[k]) for k in ("BN", "BV", "BH") if k in named)
    return {k: _plain(v) for k, v in named.items()}, variant, tiles


def _variant(named: dict) -> str:
    """``Launch.variant`` of the compile report, for when it cannot be imported."""
    parts = []
    for name, v in sorted(named.items()):
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            on = [f if x is True else f"{f}={x}" for f, x in zip(v._fields, v, strict=True)
                  if x not in (False, 0, None)]
            parts.append(f"{type(v).__name__}({','.join(on)})")
        elif name in ("BN", "BV", "BH", "GROUP", "DOT_PRECISION", "UPCAST"):
            continue
        elif v is True or (isinstance(v, int) and not isinstance(v, bool) and v):
            parts.append(name if v is True else f"{name}={v}")
    return " ".join(parts)


def kernel_record(fn, kernel, source: str, key_fn=None) -> dict:
    """One compiled kernel of ``fn``'s cache: what Triton built and what the driver reports."""
    md = kernel.metadata
    src = getattr(kernel, "src", None)
    target = getattr(md, "target", None)
    arch = getattr(target, "arch", None)
    constants = dict(getattr(src, "constants", None) or {})
    signature = dict(getattr(src, "signature", None) or {})
    constexprs, variant, tiles = _names(fn, kernel, constants)
    rec = dict(kernel=fn.__name__, arch=arch, dtype=_sig_dtype(signature), variant=variant, tiles=tiles,
               warps=getattr(md, "num_warps", None), stages=getattr(md, "num_stages", None),
               smem=getattr(md, "shared", None), constexprs=constexprs,
               signature={k: str(v) for k, v in signature.items()}, sources=[source],
               hash=str(getattr(kernel, "hash", "")))
    n_regs, n_spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    if n_regs is not None:
        # the driver's CU_FUNC_ATTRIBUTE_NUM_REGS and LOCAL_SIZE_BYTES / 4 (Triton's n_spills)
        rec.update(regs=int(n_regs), spill_bytes=int(n_spills) * 4 if n_spills is not None else None,
                   regs_from="driver")
    else:
        asm = getattr(kernel, "asm", {}) or {}
        usage = cubin_usage(asm["cubin"]) if "cubin" in asm else None
        rec.update(regs=usage[0] if usage else None, spill_bytes=usage[1] if usage else None,
                   regs_from="cubin" if usage else "")
    with contextlib.suppress(Exception):
        ptx = kernel.asm["ptx"]
        rec.update(mma=_mma(ptx), loads="cp.async" if "cp.async" in ptx else "sync")
    try:
        rec["key"] = (key_fn or default_key)(fn, kernel, arch) or ""
    except Exception:  # noqa: BLE001 - joined by constexprs instead
        rec["key"] = ""
    return rec


def kernel_records(fns, source: str, key_fn=None) -> list[dict]:
    """Every compiled kernel in the per-device JIT caches of ``fns``."""
    out = []
    for fn in fns:
        caches = getattr(fn, "device_caches", None) or {}
        for entry in list(caches.values()):
            cache = entry[0] if isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], dict) else {}
            for kernel in list(cache.values()):
                if not hasattr(kernel, "metadata"):  # an async compile still in flight
                    continue
                try:
                    out.append(kernel_record(fn, kernel, source, key_fn))
                except Exception as e:  # noqa: BLE001 - a record that says why
                    out.append(dict(kernel=getattr(fn, "__name__", "?"), sources=[source],
                                    error=f"{type(e).__name__}: {str(e)[:200]}"))
    return out


def inductor_records(source: str, seen: set | None = None, **tags) -> list[dict]:
    """The Triton kernels Inductor compiled in this process (``CachingAutotuner`` objects) that are
    not in ``seen``: name, size hints, block sizes, warps, stages, registers, spills, shared memory."""
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except Exception:  # noqa: BLE001
        return []
    seen = set() if seen is None else seen
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, CachingAutotuner) and id(obj) not in seen:
                    found.append(obj)
            except Exception:  # noqa: BLE001
                continue
    return [r for obj in found for r in _autotuner_rows(obj, seen, source, tags)]


def _autotuner_rows(obj, seen: set, source: str, tags: dict) -> list[dict]:
    seen.add(id(obj))
    rows = []
    try:
        meta = getattr(obj, "inductor_meta", None) or {}
        name = getattr(getattr(obj, "fn", None), "__name__", None) or meta.get("kernel_name", "?")
        hints = getattr(obj, "size_hints", None)
        base = dict(tags, kernel=name, source=source, heuristic=str(getattr(obj, "heuristic_type", "")),
                    size_hints=dict(hints) if isinstance(hints, dict) else _plain(hints))
        launchers = list(getattr(obj, "launchers", None) or [])
        configs = [getattr(launcher, "config", None) for launcher in launchers] or list(getattr(obj, "configs", []))[:1]
        for i, cfg in enumerate(configs or [None]):
            launcher = launchers[i] if i < len(launchers) else None
            n_spills = getattr(launcher, "n_spills", None)
            rows.append(dict(base, blocks=_plain(dict(getattr(cfg, "kwargs", {}) or {})),
                             warps=getattr(cfg, "num_warps", None), stages=getattr(cfg, "num_stages", None),
                             regs=getattr(launcher, "n_regs", None),
                             spill_bytes=n_spills * 4 if isinstance(n_spills, int) else None,
                             smem=getattr(launcher, "shared", None), compiled=launcher is not None))
    except Exception as e:  # noqa: BLE001 - best effort
        rows.append(dict(tags, kernel="?", source=source, error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def collect(source: str) -> dict:
    """This process's compiled kernels: ours (JIT caches) and Inductor's."""
    notes = []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        notes.append(f"{source}: Triton ran in its CPU interpreter (TRITON_INTERPRET=1): nothing was compiled")
    kernels = kernel_records(jit_functions(), source)
    return dict(source=source, pid=os.getpid(), kernels=kernels, inductor=inductor_records(source), notes=notes)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def pytest_sessionfinish(session, exitstatus):
    """Loaded as a pytest plugin (``-p gpu_session``): dump the kernels that the test
    run compiled, in each process that ran tests (pytest-xdist workers too)."""
    d = os.environ.get(DUMP_ENV)
    if d:
        with contextlib.suppress(Exception):
            write_json(Path(d) / f"kernels_tests_{os.getpid()}.json", collect("tests"))


# ----------------------------------------------------------------------------------- bench worker
def _raise_recompile_limit() -> None:
    """torch.compile recompiles the eager loss for every shape (dynamic=False): keep it from
    falling back to eager silently after 8 shapes in one process."""
    with contextlib.suppress(Exception):
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def bench_worker(a: argparse.Namespace) -> int:
    """One (op, V) of the grid through run.py's sweep; its kernels dumped after every provider."""
    sys.path.insert(0, str(HERE))
    import torch

    _raise_recompile_limit()
    import run as runmod
    from harness import env_info

    cuda = torch.cuda.is_available()
    argv = ["--N", *map(str, a.N), "--V", *map(str, a.V), "--H", str(a.H), "--H-t", str(a.H_t), "--dtype", a.dtype,
            "--modes", *a.modes, "--reps", str(a.reps), "--seq-len", str(a.seq_len), "--csv", str(a.csv),
            "--providers", *a.providers, "--first-estimate-s", str(a.first_estimate_s)]
    if a.worker_budget_s is not None:
        argv += ["--budget-s", str(a.worker_budget_s)]
    ap = runmod.parser(a.op, cuda)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    env = env_info(device)
    providers = runmod.select_providers(a.op, args, ap)
    source = f"bench {a.op} V={','.join(map(str, a.V))}"
    state = dict(source=source, pid=os.getpid(), kernels=[], inductor=[], notes=[], shape_s=[], not_started=[])
    seen: set = set()

    def dump(final: bool = False) -> None:
        state["kernels"] = kernel_records(jit_functions(), source)
        state["final"] = final
        write_json(a.dump, state)

    def on_provider(shape, provider, rows) -> None:
        if not (provider.name.startswith("rlad-") or provider.name == "eager"):  # those compile nothing with Inductor
            state["inductor"] += inductor_records(source, seen, provider=provider.name, shape=shape.label)
        dump()

    print(f"{a.op} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})",
          flush=True)
    rc = 0
    try:
        res = runmod.sweep(a.op, args, providers, device, env, on_provider)
        state["shape_s"] = [dict(N=s.N, V=s.V, H=s.H, H_t=s.H_t, seconds=round(t, 2)) for s, t in res["shape_s"]]
        state["not_started"] = [dict(N=s.N, V=s.V) for s in res["not_started"]]
    except KeyboardInterrupt:  # stopped at the session's time limit: the rows so far are in the CSV
        print(f"{a.op}: stopped at the time limit", flush=True)
        rc = 130
    finally:
        dump(final=True)
    return rc


# ----------------------------------------------------------------------------------- the join
def _dedup_actual(actual: list[dict]) -> list[dict]:
    merged: dict = {}
    for r in actual:
        if r.get("error"):
            continue
        ident = (r["kernel"], r.get("key") or r.get("hash") or canon([r.get("constexprs"), r.get("signature"),
                                                                     r.get("warps"), r.get("stages")]))
        if ident in merged:
            for s in r.get("sources", []):
                if s not in merged[ident]["sources"]:
                    merged[ident]["sources"].append(s)
        else:
            merged[ident] = dict(r, sources=list(r.get("sources", [])))
    return list(merged.values())


def join(actual: list[dict], predicted: list[dict], cache: list[dict] | None = None) -> list[dict]:
    """One row per compiled kernel, with its prediction: the report's result of the same compile key
    (``exact``), else of the same kernel and constexprs with the same warps and stages (``config``,
    same dtype preferred), else with other warps or stages (``constexprs``), else none; then one row
    per prediction nothing matched. ``cache`` (the committed gpu_compile.json, another triton) adds
    the measurements of the same kernel, constexprs, warps, stages and dtype there."""
    by_key = {p["key"]: p for p in predicted if p.get("key")}
    by_cfg, by_cx, by_cache = defaultdict(list), defaultdict(list), {}
    for p in predicted:
        cx = canon(p.get("constexprs", {}))
        by_cfg[(p["kernel"], cx, p.get("warps"), p.get("stages"))].append(p)
        by_cx[(p["kernel"], cx)].append(p)
    for c in cache or []:
        by_cache.setdefault((c["kernel"], canon(c.get("constexprs", {})), c.get("warps"), c.get("stages"),
                             c.get("dtype")), c)
    used: set[int] = set()
    rows = []

    def pick(cands, dtype):
        same = [c for c in cands if c.get("dtype") == dtype]
        return (same or cands)[0]

    for a in sorted(_dedup_actual(actual), key=lambda r: (r["kernel"], r.get("dtype", ""), r.get("variant", ""))):
        cx = canon(a.get("constexprs", {}))
        p, how = None, "no prediction"
        if a.get("key") and a["key"] in by_key:
            p, how = by_key[a["key"]], "exact"
        elif by_cfg.get((a["kernel"], cx, a.get("warps"), a.get("stages"))):
            p, how = pick(by_cfg[(a["kernel"], cx, a.get("warps"), a.get("stages"))], a.get("dtype")), "config"
        elif by_cx.get((a["kernel"], cx)):
            p, how = pick(by_cx[(a["kernel"], cx)], a.get("dtype")), "constexprs"
        row = dict(kernel=a["kernel"], dtype=a.get("dtype", ""), variant=a.get("variant", ""), tiles=a.get("tiles", ""),
                   warps=a.get("warps"), stages=a.get("stages"), match=how, where="; ".join(a.get("sources", [])),
                   arch=a.get("arch"), regs=a.get("regs"), spill_bytes=a.get("spill_bytes"), smem=a.get("smem"),
                   mma=a.get("mma", ""), loads=a.get("loads", ""), regs_from=a.get("regs_from", ""))
        if p is not None:
            used.add(id(p))
            row.update(_pred_cols(p))
            if isinstance(a.get("regs"), int) and isinstance(p.get("regs"), int) and p["regs"] >= 0:
                row["d_regs"] = a["regs"] - p["regs"]
            if isinstance(a.get("smem"), int) and isinstance(p.get("smem"), int) and p["smem"] >= 0:
                row["d_smem"] = a["smem"] - p["smem"]
        rows.append(dict(row, **_cache_cols(by_cache, a["kernel"], cx, a)))
    for p in predicted:
        if id(p) not in used:
            rows.append(dict(kernel=p["kernel"], dtype=p.get("dtype", ""), variant=p.get("variant", ""),
                             tiles=p.get("tiles", ""), warps=p.get("warps"), stages=p.get("stages"),
                             match="predicted, not launched", **_pred_cols(p),
                             **_cache_cols(by_cache, p["kernel"], canon(p.get("constexprs", {})), p)))
    return rows


def _cache_cols(by_cache: dict, kernel: str, cx: str, r: dict) -> dict:
    c = by_cache.get((kernel, cx, r.get("warps"), r.get("stages"), r.get("dtype")))
    if c is None:
        return {}
    return dict(cache_regs=c.get("regs"), cache_spill_bytes=c.get("spill_bytes"), cache_smem=c.get("smem"),
                cache_triton=c.get("triton", ""))


def _pred_cols(p: dict) -> dict:
    return dict(pred_arch=p.get("arch"), pred_regs=p.get("regs"), pred_spill_bytes=p.get("spill_bytes"),
                pred_smem=p.get("smem"), pred_mma=p.get("mma", ""), pred_loads=p.get("loads", ""),
                pred_problems="; ".join(p.get("problems", [])), pred_calls="; ".join(p.get("calls", [])[:3]))


def cache_predictions(arch: int | None) -> tuple[list[dict], str]:
    """The committed compile-report cache's results for ``arch`` (made on a CPU machine), with its triton."""
    path = HERE / "results" / "gpu_compile.json"
    try:
        data = json.loads(path.read_text())
    except Exception:  # noqa: BLE001
        return [], ""
    tv = data.get("triton", "")
    return [dict(r, triton=tv) for r in data.get("results", []) if arch is None or r.get("arch") == arch], tv


# ----------------------------------------------------------------------------------- the summary
def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _cell(r: dict) -> tuple:
    return (r["op"], r["provider"], r["mode"], str(r["N"]), str(r["V"]))


def latest(rows: list[dict]) -> dict[tuple, dict]:
    """The last row of each cell, a measured one over a ``skipped`` one."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = _cell(r)
        if k not in out or r["status"] != "skipped" or out[k]["status"] == "skipped":
            out[k] = r
    return out


def _f(x, fmt="{:.2f}") -> str:
    try:
        return fmt.format(float(x))
    except (TypeError, ValueError):
        return ""


def bench_tables(rows: list[dict], providers: dict[str, list[str]]) -> list[str]:
    cells = latest(rows)
    lines = []
    for op in OPS:
        mine = [r for k, r in cells.items() if k[0] == op]
        if not mine:
            continue
        order = providers.get(op, []) + sorted({r["provider"] for r in mine} - set(providers.get(op, [])))
        order = [OURS] + [p for p in order if p != OURS]
        lines += [f"### {op}", "",
                  "| V | N | mode | provider | ms (median) | TFLOP/s | x ours | MiB over inputs | MiB peak | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        shapes = sorted({(int(r["V"]), int(r["N"]), r["mode"]) for r in mine})
        for V, N, mode in shapes:
            ours = cells.get((op, OURS, mode, str(N), str(V)))
            ours_ms = float(ours["ms_p50"]) if ours and ours["status"] == "ok" and ours["ms_p50"] else None
            for prov in order:
                r = cells.get((op, prov, mode, str(N), str(V)))
                if r is None:
                    continue
                ok = r["status"] == "ok" and r["ms_p50"] != ""
                ratio = f"{float(r['ms_p50']) / ours_ms:.2f}x" if ok and ours_ms else ""
                status = "ok" if ok else f"{r['status']}: {r.get('note', '')[:70]}"
                name = f"**{prov}**" if prov == OURS else prov
                lines.append(f"| {V} | {N} | {mode} | {name} | {_f(r['ms_p50'], '{:.3f}')} "
                             f"| {_f(r['tflops'], '{:.1f}')} | {ratio} | {_f(r['mem_inc_mib'], '{:.0f}')} "
                             f"| {_f(r['mem_peak_mib'], '{:.0f}')} "
                             f"| {status} |")
        lines.append("")
    return lines


def join_tables(rows: list[dict]) -> list[str]:
    launched = [r for r in rows if r["match"] != "predicted, not launched"]
    never = [r for r in rows if r["match"] == "predicted, not launched"]
    counts = defaultdict(int)
    for r in launched:
        counts[r["match"]] += 1
    lines = [f"{len(launched)} distinct compiled kernels ("
             + (", ".join(f"{n} {m}" for m, n in sorted(counts.items())) or "none") + f"); "
             f"{len(never)} predictions not launched.", ""]
    flagged = [r for r in launched if (r.get("spill_bytes") or 0) > 0]
    if flagged:
        lines += [f"**{len(flagged)} compiled kernels spill registers**: "
                  + ", ".join(sorted({f"{r['kernel']} {r['variant']}" for r in flagged})), ""]
    hdr = ["| kernel | dtype | variant | tiles | w/s | match | regs | pred | spill B | pred | smem | pred | mma "
           "| pred | cpu cache regs | where |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def line(r):
        return (f"| {r['kernel']} | {r['dtype']} | {r['variant']} | {r['tiles']} | {r['warps']}/{r['stages']} "
                f"| {r['match']} | {_s(r.get('regs'))} | {_s(r.get('pred_regs'))} | {_s(r.get('spill_bytes'))} "
                f"| {_s(r.get('pred_spill_bytes'))} | {_s(r.get('smem'))} | {_s(r.get('pred_smem'))} "
                f"| {r.get('mma', '')} | {r.get('pred_mma', '')} | {_s(r.get('cache_regs'))} | {r.get('where', '')} |")

    bench = [r for r in launched if "bench" in (r.get("where") or "")]
    if bench:
        lines += ["Kernels the benchmarks ran:", ""] + hdr + [line(r) for r in bench] + [""]
    if launched:
        lines += ["Every compiled kernel, per name (regs min-max; |d regs| against the matched prediction):", "",
                  "| kernel | compiled | exact / config / constexprs / none | regs | pred regs | max abs d regs "
                  "| spilling | smem max |", "|---|---|---|---|---|---|---|---|"]
        by = defaultdict(list)
        for r in launched:
            by[r["kernel"]].append(r)
        for k, rs in sorted(by.items()):
            m = defaultdict(int)
            for r in rs:
                m[r["match"]] += 1
            regs = [r["regs"] for r in rs if isinstance(r.get("regs"), int)]
            pregs = [r["pred_regs"] for r in rs if isinstance(r.get("pred_regs"), int)]
            d = [abs(r["d_regs"]) for r in rs if isinstance(r.get("d_regs"), int)]
            smem = [r["smem"] for r in rs if isinstance(r.get("smem"), int)]
            lines.append(f"| {k} | {len(rs)} | {m['exact']} / {m['config']} / {m['constexprs']} / {m['no prediction']} "
                         f"| {_rng(regs)} | {_rng(pregs)} | {max(d) if d else ''} "
                         f"| {sum(1 for r in rs if (r.get('spill_bytes') or 0) > 0)} | {max(smem) if smem else ''} |")
        lines.append("")
    elif never:
        lines += ["Predictions (nothing compiled to join them with):", ""] + hdr + [line(r) for r in never] + [""]
    return lines


def _s(v) -> str:
    return "" if v is None else str(v)


def _rng(xs: list[int]) -> str:
    return "" if not xs else (str(xs[0]) if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}")


def inductor_table(recs: list[dict]) -> list[str]:
    if not recs:
        return ["None recorded (on a CPU Inductor generates C++, not Triton; or torch.compile did not run).", ""]
    lines = ["| provider | shape | kernel | size hints | blocks | warps | stages | regs | spill B | smem |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("error"):
            lines.append(f"| {r.get('provider', '')} | {r.get('shape', '')} | ? | {r['error']} | | | | | | |")
            continue
        hints = ", ".join(f"{k}={v}" for k, v in r["size_hints"].items()) if isinstance(r.get("size_hints"), dict) \
            else _s(r.get("size_hints"))
        blocks = ", ".join(f"{k}={v}" for k, v in (r.get("blocks") or {}).items())
        lines.append(f"| {r.get('provider', r.get('source', ''))} | {r.get('shape', '')} | {r['kernel']} | {hints} "
                     f"| {blocks} | {_s(r.get('warps'))} | {_s(r.get('stages'))} | {_s(r.get('regs'))} "
                     f"| {_s(r.get('spill_bytes'))} | {_s(r.get('smem'))} |")
    return lines + [""]


def summary(state: dict, bench_rows: list[dict], join_rows: list[dict]) -> str:
    env = state["env"]
    dev = env.get("device", "unknown")
    cap = env.get("capability")
    lines = [f"# GPU session {state['name']}", "",
             f"- device: **{dev}**" + (f" (sm_{cap[0]}{cap[1]}, {env.get('sms')} SMs, {env.get('mem_gib')} GiB, "
                                       f"driver {env.get('driver', '?')})" if cap else ""),
             f"- commit: **{env['commit']}** (from {env['commit_from']}); source fingerprint {env['fingerprint']}",
             f"- date: {env['date']}" + (f"; runs: {', '.join(r['date'] for r in state.get('runs', []))}"
                                         if len(state.get("runs", [])) > 1 else ""),
             f"- torch {env.get('torch')}, triton {env.get('packages', {}).get('triton')}, CUDA "
             f"{env.get('cuda_runtime')}, Python {env.get('python')}; packages: "
             + ", ".join(f"{k} {v or 'not installed'}" for k, v in env.get("packages", {}).items() if k != "triton"),
             "- " + ("DRY RUN on a CPU: small shapes; no number here is a GPU measurement" if env.get("dry_run")
                     else "every number below was measured in this session on the device above"), ""]
    lines += ["## Parts", "", "| run | part | status | seconds | detail |", "|---|---|---|---|---|"]
    runs = state.get("runs", [])
    for i, run in enumerate(runs):
        parts = state["parts"] if i == len(runs) - 1 else run.get("parts_status", {})
        for name, p in parts.items():
            lines.append(f"| {i + 1}: {run['date']} | {name} | {p.get('status', '')} | {_s(p.get('seconds'))} "
                         f"| {p.get('detail', '')} |")
    lines += ["", "## Benchmarks", "",
              "Median of `triton.testing.do_bench` (CPU: wall-clock repetitions); TFLOP/s normalized to the GEMM "
              "work 2NHV fwd + 4NHV bwd = 6NHV for `full` (the divergence adds the teacher's 2N*H_t*V); `x ours` "
              "= provider ms / rlad-triton ms (above 1: ours is faster); memory: peak allocated during one call, "
              "over what was allocated before it and absolute.", ""]
    bl = bench_tables(bench_rows, state.get("plan", {}).get("providers", {}))
    lines += bl or ["Not measured.", ""]
    skipped = [r for r in latest(bench_rows).values() if r["status"] == "skipped"]
    if skipped:
        by = defaultdict(list)
        for r in skipped:
            by[(r["op"], r["V"], r.get("note", ""))].append(f"{r['N']}/{r['provider']}")
        lines += ["Not run in this session:", ""] + [f"- {op} V={V}: {len(v)} cells ({note})"
                                                     for (op, V, note), v in sorted(by.items())] + [""]
    pred = state.get("predicted") or {}
    lines += ["## Compile: what Triton built vs the CPU-side prediction", "",
              f"Prediction: `gpu_compile_report.py` for sm_{pred.get('arch', '?')} ({pred.get('detail', 'not run')}; "
              f"triton {pred.get('triton', '?')}), joined by compile key (`exact`: same specialization), else by "
              f"kernel name + constexprs + warps/stages (`config`), else name + constexprs (`constexprs`). "
              "Actual regs and spills are the driver's (`CU_FUNC_ATTRIBUTE_NUM_REGS`, local bytes) after the "
              "kernel ran; `cpu cache regs`: the committed report cache "
              f"(triton {state.get('cache_triton') or '?'}) for the same kernel, constexprs, warps, stages, dtype.", ""]
    lines += join_tables(join_rows) if join_rows else ["Nothing compiled and no prediction.", ""]
    lines += ["## torch.compile (Inductor) kernels of the eager baselines", ""]
    lines += inductor_table(state.get("inductor", []))
    notes = sorted(set(state.get("notes", [])))
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- the session
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=("tests", "compile", "bench"), default=["tests", "compile", "bench"])
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole call (540; dry run 100)")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="seconds kept at the end for the summary")
    ap.add_argument("--tests-timeout-s", type=float, default=None, help="limit of the test run (300; dry run 60)")
    ap.add_argument("--pytest-args", default=None, help="pytest arguments, one string (default 'tests -q')")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--V", type=int, nargs="+", default=None, help="vocabulary sizes (128256 151936)")
    ap.add_argument("--N", type=int, nargs="+", default=None, help="token counts (8192 16384 32768 65536)")
    ap.add_argument("--H", type=int, default=None)
    ap.add_argument("--H-t", type=int, default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    ap.add_argument("--modes", nargs="+", choices=("fwd", "bwd", "full"), default=None, help="(full)")
    ap.add_argument("--providers", nargs="+", default=None,
                    help="providers, each op keeping those it has (default: ours, eager, torch.compile, Liger, CCE)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--compile-arch", type=int, default=None, help="architecture to predict for (default: the GPU's)")
    ap.add_argument("--compile-groups", nargs="+", default=None, help="report groups (standard epilogue)")
    ap.add_argument("--compile-dtypes", nargs="+", default=None)
    ap.add_argument("--compile-calls", nargs="+", default=None)
    ap.add_argument("--compile-jobs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="session folder (default: $OUT/<name> when $OUT is set, else benchmarks/results/gpu/<name>; "
                         "dry run: a temporary folder)")
    ap.add_argument("--resume", type=Path, default=None, help="continue this session folder")
    ap.add_argument("--dry-run", action="store_true", help="CPU, small shapes, a test subset, one report arch")
    ap.add_argument("--fingerprint", action="store_true", help="print the source fingerprint and exit")
    # a bench worker (internal)
    ap.add_argument("--worker", choices=("bench",), help=argparse.SUPPRESS)
    ap.add_argument("--op", choices=OPS, help=argparse.SUPPRESS)
    ap.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--first-estimate-s", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    defaults = DRY if a.dry_run else GRID
    for k, v in defaults.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def child_env(a: argparse.Namespace, **extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if a.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run also where a GPU is present
    return env


def report_arch(info: dict) -> int | None:
    """The architecture to predict for: the GPU's if the compile report knows it, else its family's
    (the tile configuration ``launch.gpu_family`` picks: sm_8x -> 80, sm_9x -> 90, sm_10x/11x -> 100)."""
    cap = info.get("capability")
    if not cap:
        return None
    cc = cap[0] * 10 + cap[1]
    known = info.get("report_archs") or [80, 90, 100]
    return cc if cc in known else {9: 90, 10: 100, 11: 100}.get(cap[0], 80)


def plan_grid(a: argparse.Namespace, known: dict[str, list[str]] | None) -> dict:
    """The grid; ``--providers`` keeps, for each op, the names that op has (``known``: from
    providers.py, read by the probe)."""
    known = known or {op: SESSION_PROVIDERS[op] + ["rlad-torch"] for op in OPS}
    providers = {op: [p for p in (a.providers or SESSION_PROVIDERS[op]) if p in known.get(op, [])] for op in a.ops}
    return dict(ops=list(a.ops), V=a.V, N=a.N, H=a.H, H_t=a.H_t, dtype=a.dtype, modes=a.modes, providers=providers)


def _dtype_name(short: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[short]


def done_cells(rows: list[dict], grid: dict) -> set[tuple]:
    """Cells of ``grid`` that already have a row other than ``skipped`` (for --resume)."""
    return {_cell(r) for r in rows if r["status"] != "skipped" and str(r["H"]) == str(grid["H"])
            and r["dtype"] == _dtype_name(grid["dtype"])}


class Session:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.budget_s - a.reserve_s
        self.tmp = Path(tempfile.mkdtemp(prefix="rlad_gpu_session_"))
        self.env_child = child_env(a)
        info = probe(self.env_child)
        commit, commit_from = git_commit()
        now = utc_now()
        self.env = dict(info, date=now.strftime("%Y-%m-%dT%H:%M:%SZ"), commit=commit, commit_from=commit_from,
                        fingerprint=fingerprint(), dry_run=a.dry_run)
        self.arch = a.compile_arch or report_arch(info)
        prev = None
        if a.resume:
            with contextlib.suppress(Exception):
                prev = json.loads((a.resume / "session.json").read_text())
            if prev is not None and prev.get("env", {}).get("device") != info.get("device"):
                print(f"not resuming {a.resume}: it was measured on {prev.get('env', {}).get('device')}, this is "
                      f"{info.get('device')} (timings are compared on one device only); a new session starts",
                      flush=True)
                prev, a.resume = None, None
        if a.resume:
            name = a.resume.name
        else:
            name = f"{now.strftime('%Y%m%d-%H%M')}_{slug(info.get('device', 'device'))}" + ("-dry-run" if a.dry_run
                                                                                           else "")
        out_env = os.environ.get("OUT")
        dirs = []
        if a.out is not None:
            dirs.append(a.out)
        elif out_env:
            dirs.append(Path(out_env) / name)
        elif a.dry_run:
            dirs.append(Path(tempfile.mkdtemp(prefix="rlad_gpu_dry_run_")) / name)
        else:
            dirs.append(RESULTS / name)
        if out_env and a.out is not None:
            dirs.append(Path(out_env) / name)
        if not a.dry_run:
            dirs.append(RESULTS / name)
        self.out = Out(dirs, self.t0, self.deadline)
        if a.resume and a.resume.resolve() != self.out.primary.resolve():
            for f in ("bench.csv", "tests.log", "session.log"):
                if (a.resume / f).is_file():
                    shutil.copyfile(a.resume / f, self.out.path(f))
        self.grid = plan_grid(a, info.get("providers"))
        cache, cache_triton = cache_predictions(self.arch)
        self.state = dict(schema=1, name=name, env=self.env, args={k: (str(v) if isinstance(v, Path) else v)
                                                                   for k, v in vars(a).items()},
                          plan=self.grid, parts={}, predicted=None, actual=[], inductor=[], notes=[], workers=[],
                          runs=[], cache_triton=cache_triton)
        if prev:
            for k in ("predicted", "actual", "inductor", "notes", "workers", "runs"):
                if prev.get(k):
                    self.state[k] = prev[k]
            if self.state["runs"]:
                self.state["runs"][-1]["parts_status"] = prev.get("parts", {})
        self.state["runs"] = self.state["runs"] + [dict(date=self.env["date"], commit=commit, parts=a.parts,
                                                        fingerprint=self.env["fingerprint"],
                                                        device=self.env.get("device"))]
        cap = info.get("capability")
        if self.arch is not None and cap and self.arch != cap[0] * 10 + cap[1]:
            self.state["notes"].append(f"the compile report has no sm_{cap[0]}{cap[1]}: predictions are for "
                                       f"sm_{self.arch}, whose tile configuration this GPU takes")
        self.cache = cache

    # -- bookkeeping
    def part(self, name: str, **kw) -> None:
        self.state["parts"].setdefault(name, {}).update(kw)

    def header(self, what: str) -> str:
        e = self.env
        return (f"# {what}: device={e.get('device')} commit={e['commit']} ({e['commit_from']}) date={e['date']} "
                f"fingerprint={e['fingerprint']} session={self.state['name']}\n")

    def absorb_dumps(self) -> None:
        """Kernels from the dumps of finished or running children (each dump replaces its earlier self)."""
        for path in sorted(self.tmp.glob("tests/*.json")) + sorted(self.tmp.glob("bench/*.json")):
            try:
                d = json.loads(path.read_text())
            except Exception:  # noqa: BLE001 - being written; read at the next checkpoint
                continue
            tag = f"{path}:{d.get('pid')}"
            self.state["actual"] = [r for r in self.state["actual"] if r.get("_dump") != tag]
            self.state["inductor"] = [r for r in self.state["inductor"] if r.get("_dump") != tag]
            self.state["actual"] += [dict(r, _dump=tag) for r in d.get("kernels", [])]
            self.state["inductor"] += [dict(r, _dump=tag) for r in d.get("inductor", [])]
            self.state["notes"] = sorted(set(self.state["notes"]) | set(d.get("notes", [])))

    def checkpoint(self) -> None:
        try:
            self.absorb_dumps()
            pred = (self.state.get("predicted") or {}).get("results", [])
            rows = join(self.state["actual"], pred, self.cache)
            e = self.env
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=JOIN_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(dict(r, date=e["date"], commit=e["commit"], device=e.get("device")))
            self.out.write("compile_join.csv", buf.getvalue())
            self.state["join"] = rows
            self.out.write("session.json", json.dumps(self.state, default=str, indent=1))
            self.out.write("summary.md", summary(self.state, read_rows(self.out.path("bench.csv")), rows))
        except Exception as e:  # noqa: BLE001 - never lose the session to its own bookkeeping
            self.out.log(f"checkpoint failed: {type(e).__name__}: {e}")
        self.out.sync()

    # -- the plan
    def print_plan(self) -> None:
        a, e, g = self.a, self.env, self.grid
        log = self.out.log
        log(f"rlad GPU session {self.state['name']}" + (" (DRY RUN: CPU, small shapes)" if a.dry_run else ""))
        cap = e.get("capability")
        log(f"device: {e.get('device')}" + (f" sm_{cap[0]}{cap[1]}, {e.get('sms')} SMs, {e.get('mem_gib')} GiB, "
                                            f"driver {e.get('driver', '?')}" if cap else "")
            + f"; torch {e.get('torch')}, triton {e.get('packages', {}).get('triton')}, Python {e.get('python')}")
        log(f"commit: {e['commit']} (from {e['commit_from']}); source fingerprint {e['fingerprint']}"
            + ("  <- pass RLAD_COMMIT=<sha> in the command: this copy has no git" if e["commit"] == "unknown" else ""))
        missing = [k for k in ("liger-kernel", "cut-cross-entropy") if not e.get("packages", {}).get(k)]
        log("packages: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in e.get("packages", {}).items())
            + (f"  <- {', '.join(missing)} MISSING: their providers will say 'unavailable' (carry .whl)"
               if missing else ""))
        if e.get("error"):
            log(f"probe: {e['error']}")
        log(f"output: {', '.join(str(d) for d in self.out.dirs)}")
        log(f"budget: {a.budget_s:.0f} s, of which {a.reserve_s:.0f} s kept for the summary"
            + (f"; resuming {a.resume}" if a.resume else ""))
        log(f"parts: {' '.join(p for p in ('compile', 'tests', 'bench') if p in a.parts)}")
        if "compile" in a.parts:
            log(f"  compile: gpu_compile_report.py --no-write --json --archs {self.arch} --groups "
                f"{' '.join(a.compile_groups)}"
                + (f" --dtypes {' '.join(a.compile_dtypes)}" if a.compile_dtypes else "")
                + (f" --calls {' '.join(map(repr, a.compile_calls))}" if a.compile_calls else "")
                + (" (in the background during the tests)" if "tests" in a.parts else ""))
        if "tests" in a.parts:
            log(f"  tests: python -m pytest {a.pytest_args} (limit {a.tests_timeout_s:.0f} s), log tests.log")
        if "bench" in a.parts:
            n_cells = sum(len(g["V"]) * len(g["N"]) * len(g["providers"][op]) * len(g["modes"]) for op in g["ops"])
            log(f"  bench: {len(g['ops'])} ops x V {g['V']} x N {g['N']} x modes {g['modes']}, {g['dtype']}, "
                f"H={g['H']}, H_t={g['H_t']}: {n_cells} cells in {len(g['ops']) * len(g['V'])} workers "
                f"(V, then op; N ascending; a shape starts only if its estimate fits)")
            for op in g["ops"]:
                log(f"    {op}: {' '.join(g['providers'][op])}")

    # -- parts
    def start_compile(self) -> Job | None:
        a = self.a
        if self.arch is None:
            self.part("compile", status="not run", detail="no GPU architecture (pass --compile-arch)")
            return None
        self._pred_json = self.tmp / "predicted" / "report.json"
        self._pred_json.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / "gpu_compile_report.py"), "--no-write", "--json", str(self._pred_json),
               "--archs", str(self.arch), "--groups", *a.compile_groups,
               "--jobs", str(a.compile_jobs or max(1, min(8, (os.cpu_count() or 2) - 2)))]
        if a.compile_dtypes:
            cmd += ["--dtypes", *a.compile_dtypes]
        if a.compile_calls:
            cmd += ["--calls", *a.compile_calls]
        self._compile_cmd = cmd
        self.out.log(f"compile: started ({' '.join(shlex.quote(c) for c in cmd[1:])})")
        self.part("compile", status="running")
        return Job(cmd, self.env_child, self.out.path("session.log"), echo=False,
                   header=self.header("gpu_compile_report output"))

    def finish_compile(self, job: Job) -> None:
        rc = job.wait(self.out.left())
        data = None
        if self._pred_json.is_file():
            with contextlib.suppress(Exception):
                data = json.loads(self._pred_json.read_text())
        if data is None and rc == 2 and any("unknown archs" in line for line in job.tail):
            self.state["notes"].append(f"gpu_compile_report has no sm_{self.arch}: no prediction")
        tail = [line for line in job.tail if line.strip()][-1:] or [""]
        status = ("killed at the time limit" if job.killed else "ok" if data is not None
                  else f"failed (rc {rc})")
        n = len(data["results"]) if data else 0
        detail = f"{n} launches predicted; {tail[0][:120]}"
        self.part("compile", status=status, seconds=job.seconds, rc=rc, detail=detail)
        if data is not None:
            self.state["predicted"] = dict(arch=self.arch, triton=data.get("triton"), detail=detail,
                                           command=" ".join(self._compile_cmd[1:]), results=data["results"],
                                           report_env={k: data.get(k) for k in ("date", "commit", "triton", "torch")})
        self.out.log(f"compile: {status} in {job.seconds} s: {detail}")

    def run_tests(self) -> None:
        a = self.a
        dump_dir = self.tmp / "tests"
        dump_dir.mkdir(exist_ok=True)
        args = shlex.split(a.pytest_args)
        cmd = [sys.executable, "-m", "pytest", "-p", "gpu_session", *args]
        limit = min(a.tests_timeout_s, self.out.left())
        if limit < 10:
            self.part("tests", status="not run", detail=f"no time left ({limit:.0f} s)")
            self.out.log("tests: not run: no time left")
            return
        self.out.log(f"tests: started: python -m pytest {a.pytest_args} (limit {limit:.0f} s)")
        self.part("tests", status="running", command=f"python -m pytest {a.pytest_args}")
        env = dict(self.env_child, **{DUMP_ENV: str(dump_dir)})
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE)])  # the plugin, by its top-level name
        job = Job(cmd, env, self.out.path("tests.log"),
                  header=self.header("python -m pytest " + a.pytest_args))
        rc = job.wait(limit)
        result = next((line.strip("= ") for line in reversed(job.tail)
                       if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)|no tests ran", line)), "")
        status = (f"killed at its {limit:.0f} s limit" if job.killed else "passed" if rc == 0
                  else f"failed (rc {rc})")
        self.part("tests", status=status, seconds=job.seconds, rc=rc, detail=result)
        self.out.log(f"tests: {status} in {job.seconds} s: {result}")

    def run_bench(self) -> None:
        a, g = self.a, self.grid
        csv_path = self.out.path("bench.csv")
        done = done_cells(read_rows(csv_path), g) if a.resume else set()
        rates: dict[str, float] = {}
        t_bench = time.monotonic()
        self.part("bench", status="running")
        reasons: dict[tuple, str] = {}
        ran = 0
        for V in g["V"]:
            for op in g["ops"]:
                todo_N, provs = [], []
                for N in g["N"]:
                    missing = [p for p in g["providers"][op]
                               if any((op, p, m, str(N), str(V)) not in done for m in g["modes"])]
                    if missing:
                        todo_N.append(N)
                        provs += [p for p in missing if p not in provs]
                if not todo_N:
                    continue
                provs = [p for p in g["providers"][op] if p in provs]
                left = self.out.left()
                size = lambda N, op=op, V=V: float(N) * V * (g["H"] + (g["H_t"] if op == "divergence" else 0))  # noqa: E731
                rate = rates.get(op) or (max(rates.values()) if rates else 0.0)
                first = rate * size(todo_N[0])
                if left < 15 or first > left:
                    reasons[(op, V)] = (f"not run: time budget (--budget-s {a.budget_s:.0f}; {max(left, 0):.0f} s "
                                        f"left, first shape estimated {first:.0f} s)")
                    self.out.log(f"bench {op} V={V}: not started ({reasons[(op, V)]})")
                    continue
                dump = self.tmp / "bench" / f"{op}_V{V}.json"
                dump.parent.mkdir(exist_ok=True)
                cmd = [sys.executable, str(HERE / "gpu_session.py"), "--worker", "bench", "--op", op,
                       "--V", str(V), "--N", *map(str, todo_N), "--H", str(g["H"]), "--H-t", str(g["H_t"]),
                       "--dtype", g["dtype"], "--modes", *g["modes"], "--reps", str(a.reps), "--seq-len",
                       str(a.seq_len), "--providers", *provs, "--csv", str(csv_path), "--dump", str(dump),
                       "--worker-budget-s", f"{max(left - 5, 1):.0f}", "--first-estimate-s", f"{first:.0f}"]
                self.out.log(f"bench {op} V={V}: N {todo_N}, {' '.join(provs)}")
                job = Job(cmd, self.env_child, self.out.path("session.log"),
                          header=self.header(f"bench worker {op} V={V}"))
                rc = job.wait(left)
                ran += 1
                wd = {}
                with contextlib.suppress(Exception):
                    wd = json.loads(dump.read_text())
                for s in wd.get("shape_s", []):
                    rates[op] = max(rates.get(op, 0.0), s["seconds"] / size(s["N"]))
                status = ("killed at the time limit" if job.killed else "ok" if rc == 0 else f"failed (rc {rc})")
                reasons[(op, V)] = {"ok": "not run: time budget (shape not started)",
                                    "killed at the time limit": "not run: worker stopped at the time limit"}.get(
                    status, f"not run: worker {status}: {(job.tail[-1] if job.tail else '')[:100]}")
                self.state["workers"].append(dict(op=op, V=V, N=todo_N, providers=provs, status=status, rc=rc,
                                                  seconds=job.seconds, shape_s=wd.get("shape_s", []),
                                                  not_started=wd.get("not_started", [])))
                self.out.log(f"bench {op} V={V}: {status} in {job.seconds} s")
                self.checkpoint()
        added = self.fill_gaps(reasons)
        self.part("bench", status="done" if not added else f"done; {added} cells not run",
                  seconds=round(time.monotonic() - t_bench, 1), detail=f"{ran} workers")

    def fill_gaps(self, reasons: dict) -> int:
        """A ``skipped`` row for every planned cell that has no row, saying why."""
        sys.path.insert(0, str(HERE))
        from harness import CSV_FIELDS

        g, e = self.grid, self.env
        path = self.out.path("bench.csv")
        have = {_cell(r) for r in read_rows(path)}
        new = []
        for op in g["ops"]:
            for V in g["V"]:
                for N in g["N"]:
                    for p in g["providers"][op]:
                        for m in g["modes"]:
                            if (op, p, m, str(N), str(V)) not in have:
                                new.append(dict(date=utc_now().strftime("%Y-%m-%dT%H:%MZ"), commit=e["commit"],
                                                device=e.get("device"), torch=e.get("torch"),
                                                triton=e.get("packages", {}).get("triton"), op=op, provider=p, mode=m,
                                                N=N, H=g["H"], V=V, H_t=g["H_t"] if op == "divergence" else "",
                                                dtype=_dtype_name(g["dtype"]), status="skipped",
                                                note=reasons.get((op, V), "not run: time budget")))
        if new:
            exists = path.is_file()
            with path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                if not exists:
                    w.writeheader()
                w.writerows(new)
        return len(new)

    def run(self) -> int:
        a = self.a
        self.out.append("session.log", self.header("rlad GPU session"))
        self.print_plan()
        self.checkpoint()
        rc = 0
        try:
            job = self.start_compile() if "compile" in a.parts else None
            if job is not None and "tests" not in a.parts:
                self.finish_compile(job)
                job = None
                self.checkpoint()
            if "tests" in a.parts:
                self.run_tests()
                if job is not None:
                    self.finish_compile(job)
                    job = None
                self.checkpoint()
            if "bench" in a.parts:
                self.run_bench()
        except KeyboardInterrupt:
            self.state["notes"].append("the session was interrupted")
            self.out.log("interrupted: stopping the running children")
            for job in list(RUNNING):
                with contextlib.suppress(Exception):
                    job.stop(grace=5)
            rc = 130
        finally:
            self.checkpoint()
            for name, p in self.state["parts"].items():
                self.out.log(f"{name}: {p.get('status')} {p.get('detail', '')}")
            cells = latest(read_rows(self.out.path("bench.csv"))).values()
            if cells:
                counts = defaultdict(int)
                for r in cells:
                    counts[r["status"]] += 1
                self.out.log("bench cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            self.out.log(f"done: {self.out.primary / 'summary.md'}")
            self.out.sync()
            shutil.rmtree(self.tmp, ignore_errors=True)
        bad = [k for k, p in self.state["parts"].items() if "(earlier)" not in k
               and p.get("status") not in ("passed", "ok", "done")]
        return rc or (1 if bad else 0)


def _on_term(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker == "bench":
        return bench_worker(a)
    if a.fingerprint:
        print(fingerprint())
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    return Session(a).run()


if __name__ == "__main__":
    if __package__ in (None, ""):  # python benchmarks/gpu_session.py: rlad_kernels from this checkout
        sys.path.insert(1, str(ROOT))
    sys.exit(main())
