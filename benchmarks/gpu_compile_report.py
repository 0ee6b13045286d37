"""Compile every Triton launch of the public ops for NVIDIA GPUs, on a machine without one.

The public ops run with ``impl="triton"`` on CPU tensors while Triton's own JIT specializes
each launch exactly as it would on a GPU (a stand-in driver reports the target; Triton's real
binder builds the signature, the constexprs and the alignment attributes), and the compile
step records the launch instead of building it. Each distinct launch is then compiled with
``triton.compile`` for every requested architecture, and the cubin is read with the
``cuobjdump`` that ships inside the triton wheel: registers, spill stack, shared memory, the
tensor-core instruction the loop uses and whether its loads are pipelined.

    python benchmarks/gpu_compile_report.py                  # the tables -> benchmarks/results/gpu_compile*.{csv,md}
    python benchmarks/gpu_compile_report.py --archs 80 --dtypes fp32 --no-write

Variants (``--groups``):
  standard   every kernel at every dtype: log-probs with/without bias, entropy and soft cap,
             vocabulary split and not, the policy loss with its heaviest epilogue, split and not,
             soft-capped and not, the three divergence kinds, split and not, with/without biases
             and soft caps;
  epilogue   (bf16) a covering set of the policy epilogue's options: every value of every
             EpilogueFlags field and every per-token input's presence appears, with the
             options that interact (teacher x mixture x clamp, gate x mixture, KD x KD weights) crossed;
  autotune   (bf16, fp32) every tile configuration of the opt-in autotune space.

A launch has a problem when it does not compile, spills registers, needs more shared memory
than the architecture has, or (16-bit inputs) multiplies without tensor cores. Exit status 1
when any launch has one.

Cache: every result is stored in ``benchmarks/results/gpu_compile.json`` under the key Triton
itself compiles by (the kernel's source and everything it calls, the specialized signature,
constexprs and attributes, the target, warps, stages, the triton version), so a run compiles
only the launches whose code or configuration changed since the cache was written; the test
suite reads it the same way (``--no-write`` leaves it untouched). The cache holds one full
default run per Triton version (each result names its ``triton``; ``versions`` holds each run's
date, commit, torch and architectures): a full default run replaces the entries of its own
version and keeps those of the others, so running the report under each installed Triton (e.g.
3.9 as in CI, 3.6 as on the GPU image) fills it for both. Other runs (``--calls``, ``--override``,
fewer groups, dtypes or archs, another ``--shape``) never write the cache.

Tables, one pair per Triton version in the cache: the newest version's in ``gpu_compile.csv`` /
``gpu_compile.md``, every other version's in ``gpu_compile_triton<version>.csv`` / ``.md`` (e.g.
``gpu_compile_triton3.6.0.md``). A full run rewrites every version's tables from the merged cache;
any other run writes only its own results, under its version's names.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real JIT, not the interpreter (before triton is imported)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# per architecture: the most dynamic shared memory one block may use, and the tensor-core
# instruction a 16-bit tl.dot must become
ARCHS = {
    80: dict(smem=166912, mma="mma.sync"),   # A100
    90: dict(smem=232448, mma="wgmma"),      # H100 / H200
    100: dict(smem=232448, mma="tcgen05"),   # B200
}
GROUPS = ("standard", "epilogue", "autotune")
RESULTS = ROOT / "benchmarks" / "results"


def supported_archs() -> list[int]:
    """The architectures of ``ARCHS`` this triton can build cubins for."""
    out = []
    for cc in ARCHS:
        try:
            make_backend(GPUTarget("cuda", cc, 32))
        except Exception:  # pragma: no cover - depends on the triton build
            continue
        out.append(cc)
    return out


# --------------------------------------------------------------------------- recording launches
class _TargetOnlyDriver:
    """Enough of a driver for Triton's JIT to specialize launches for ``target`` without a GPU."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclass
class Launch:
    """One distinct kernel launch as Triton's JIT specialized it, and the calls that made it."""

    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    dtype: str
    calls: list[str] = field(default_factory=list)

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def named(self) -> dict:
        """The kernel's declared constexpr arguments by name (not integers the JIT specialized)."""
        return {self.fn.arg_names[p[0]]: v for p, v in self.constexprs.items()
                if len(p) == 1 and self.fn.params[p[0]].is_constexpr}

    def variant(self) -> str:
        """The launch's options, compactly: boolean/int constexprs that are set, and the set fields
        of named-tuple constexprs (tile sizes and precision left out)."""
        parts = []
        for name, v in sorted(self.named().items()):
            if isinstance(v, tuple) and hasattr(v, "_fields"):
                on = [f if x is True else f"{f}={x}" for f, x in zip(v._fields, v, strict=True)
                      if x not in (False, 0, None)]
                parts.append(f"{type(v).__name__}({','.join(on)})")
            elif name in ("BM", "BN", "BK", "BV", "BH", "GROUP", "DOT_PRECISION", "UPCAST"):
                continue
            elif v is True or (isinstance(v, int) and not isinstance(v, bool) and v):
                parts.append(name if v is True else f"{name}={v}")
        return " ".join(parts)

    def tiles(self) -> str:
        n = self.named()
        keys = ("BM", "BN", "BK") if "BM" in n else ("BN", "BV", "BH")
        return "x".join(str(n[k]) for k in keys if k in n)


def record(calls: dict, arch: int) -> list[Launch]:
    """Run ``calls`` (name -> (dtype name, thunk)) with every Triton compile recorded, not built,
    with the tile configurations the library picks for an ``arch`` GPU."""
    launches: dict = {}
    current = {}

    def _record(self, key, signature, device, constexprs, options, attrs, warmup):
        launch = launches.get((self.__name__, key))
        if launch is None:
            launch = launches[(self.__name__, key)] = Launch(self, signature, constexprs, attrs, options.num_warps,
                                                             options.num_stages, current["dtype"])
        if current["name"] not in launch.calls:
            launch.calls.append(current["name"])
        return None  # nothing to launch: the JIT returns before running a kernel

    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction._do_compile = _record
    from rlad_kernels.ops.common import launch
    from rlad_kernels.utils import dispatch
    dispatch.triton_interpreting = lambda: True  # impl="triton" accepts CPU tensors; tile configs stay the GPU's
    launch.gpu_family = lambda device: arch      # ... those of an ``arch`` GPU
    for name, (dtype, thunk) in calls.items():
        current.update(name=name, dtype=dtype)
        try:
            thunk()
        except Exception as e:  # host code may trip on the garbage outputs of unlaunched kernels
            print(f"note: {name}: host code raised {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
    return list(launches.values())


# --------------------------------------------------------------------------- the variants
def _inputs(dt: torch.dtype, N: int, H: int, V: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, H, dtype=dt).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H, dtype=dt).normal_(generator=g).mul_(0.02).requires_grad_()
    return dict(x=x, w=w, b=torch.zeros(V, dtype=dt, requires_grad=True),
                xt=torch.empty(N, H + 256, dtype=dt).normal_(generator=g),
                wt=torch.empty(V + 64, H + 256, dtype=dt).normal_(generator=g),
                bt=torch.zeros(V + 64, dtype=dt), y=torch.randint(0, V, (N,), generator=g),
                adv=torch.randn(N, generator=g), old=torch.full((N,), -2.0), tea=torch.full((N,), -2.5),
                ref=torch.full((N,), -2.2), tw=torch.rand(N, generator=g), kdw=torch.ones(N))


def _backward(fn):
    """``fn`` and the backward of what it returns: every launch of the forward and the backward."""
    def run():
        out = fn()
        out = sum(o.sum() for o in out) if isinstance(out, tuple) else out
        if out.requires_grad:
            out.sum().backward()
    return run


def _split(fn):
    """Run ``fn`` (forward and backward) with the vocabulary split across programs (what small N
    does on a GPU) and the dW GEMM's rows split too."""
    import rlad_kernels as rk

    def run():
        with rk.triton_config(split_v=4, dw_split_k=3):
            return _backward(fn)()
    return run


# the policy epilogue's covering set: (config kwargs, per-token inputs given, bias)
EPILOGUE_CASES = {
    "grpo": (dict(), (), False),
    "grpo+dual+ref+weights": (dict(dual_clip=3.0, ref_kl_coef=0.1), ("ref", "tw"), True),
    "trrd-geometric-clamp": (dict(), ("tea",), False),
    "trrd-geometric-noclamp+entropy-bonus": (dict(teacher_clamp=None, entropy_coef=0.01), ("tea", "tw"), True),
    "trrd-arithmetic+dual": (dict(mixture="arithmetic", dual_clip=2.0), ("tea",), False),
    "kdrl-k1+kdw-noentropy": (dict(alpha=1.0, kd_estimator="k1", kd_coef=0.1, compute_entropy=False), ("tea", "kdw"),
                              False),
    "kdrl-k2+ref": (dict(alpha=1.0, kd_estimator="k2", kd_coef=0.1, ref_kl_coef=0.1), ("tea", "ref"), True),
    "kdrl-k3+kdw+weights": (dict(alpha=1.0, kd_estimator="k3", kd_coef=0.1), ("tea", "kdw", "tw"), False),
    "trrd-arithmetic+k3+entropy-bonus": (dict(mixture="arithmetic", kd_estimator="k3", kd_coef=0.1,
                                              entropy_coef=0.01), ("tea",), False),
    "trrd-arithmetic+gate": (dict(mixture="arithmetic", teacher_align_threshold=1.0), ("tea",), False),
    "cispo-trrd+gate+ref+k2": (dict(objective="cispo", teacher_align_threshold=1.0, ref_kl_coef=0.1,
                                    kd_estimator="k2", kd_coef=0.1), ("tea", "ref", "tw"), True),
    "cispo+entropy-token-mean": (dict(objective="cispo", entropy_coef=0.01, entropy_aggregation="token_mean"),
                                 ("tw",), False),
    "everything": (dict(dual_clip=3.0, kd_estimator="k2", kd_coef=0.1, ref_kl_coef=0.1, entropy_coef=0.01,
                        teacher_align_threshold=1.0, teacher_adv_threshold=0.1, teacher_clamp_grad="straight_through"),
                   ("tea", "ref", "tw", "kdw"), True),
}
_KW = dict(tea="teacher_logp", ref="ref_logp", tw="token_weights", kdw="kd_weights")


def _policy(t: dict, cfg_kw: dict, given, bias: bool, softcap: float | None = None):
    import rlad_kernels as rk

    kw = {_KW[k]: t[k] for k in given}
    return lambda: rk.linear_policy_loss(t["x"], t["w"], t["y"], t["adv"], t["old"], bias=t["b"] if bias else None,
                                         config=rk.PolicyLossConfig(**cfg_kw), softcap=softcap, impl="triton",
                                         **kw).loss


def variants(groups, dtypes, shape, arch: int) -> dict:
    """name -> (dtype name, thunk) for every public-op call of the chosen groups; each thunk runs
    the forward and the backward."""
    import rlad_kernels as rk

    N, H, V = shape
    calls = {}
    if "standard" in groups:
        for dn in dtypes:
            t = _inputs(DTYPES[dn], N, H, V)
            x, w, b, y = t["x"], t["w"], t["b"], t["y"]
            calls[f"{dn} logprobs"] = (dn, _backward(lambda x=x, w=w, y=y: rk.linear_logprobs(x, w, y, impl="triton")))
            calls[f"{dn} logprobs+bias+entropy"] = (dn, _backward(lambda x=x, w=w, y=y, b=b: rk.linear_logprobs(
                x, w, y, bias=b, return_entropy=True, impl="triton")))
            calls[f"{dn} logprobs split"] = (dn, _split(lambda x=x, w=w, y=y: rk.linear_logprobs(
                x, w, y, return_entropy=True, impl="triton")))
            calls[f"{dn} logprobs+bias+entropy+softcap"] = (dn, _backward(lambda x=x, w=w, y=y, b=b: rk.linear_logprobs(
                x, w, y, bias=b, return_entropy=True, softcap=30.0, impl="triton")))
            heavy = EPILOGUE_CASES["everything"]
            calls[f"{dn} policy everything"] = (dn, _backward(_policy(t, *heavy)))
            calls[f"{dn} policy everything+softcap"] = (dn, _backward(_policy(t, *heavy, softcap=30.0)))
            calls[f"{dn} policy everything split"] = (dn, _split(_policy(t, *heavy)))
            for kind in ("reverse_kl", "forward_kl", "jsd"):
                calls[f"{dn} divergence {kind}"] = (dn, _backward(lambda t=t, kind=kind: rk.linear_divergence(
                    t["x"], t["w"], t["xt"], t["wt"], kind=kind, impl="triton")))
                calls[f"{dn} divergence {kind} split+bias"] = (dn, _split(lambda t=t, kind=kind: rk.linear_divergence(
                    t["x"], t["w"], t["xt"], t["wt"], student_bias=t["b"], teacher_bias=t["bt"], kind=kind,
                    impl="triton")))
                calls[f"{dn} divergence {kind} softcaps"] = (dn, _backward(lambda t=t, kind=kind: rk.linear_divergence(
                    t["x"], t["w"], t["xt"], t["wt"], student_softcap=30.0, teacher_softcap=50.0, kind=kind,
                    impl="triton")))
    if "epilogue" in groups:
        t = _inputs(torch.bfloat16, N, H, V)
        for name, case in EPILOGUE_CASES.items():
            calls[f"bf16 policy {name}"] = ("bf16", _backward(_policy(t, *case)))
        calls["bf16 policy everything split"] = ("bf16", _split(_policy(t, *EPILOGUE_CASES["everything"])))
    if "autotune" in groups:  # every candidate of the family's space, with the heaviest launches
        from rlad_kernels.ops.common.launch import AUTOTUNE_SPACE

        for dn in dtypes:
            t = _inputs(DTYPES[dn], N, H, V)
            for i, cand in enumerate(AUTOTUNE_SPACE[(arch, dn == "fp32")]):
                def run(t=t, cand=cand):
                    with rk.triton_config(**cand):
                        _backward(_policy(t, *EPILOGUE_CASES["everything"]))()
                        _backward(lambda: rk.linear_divergence(t["x"], t["w"], t["xt"], t["wt"], kind="jsd",
                                                               impl="triton"))()
                calls[f"{dn} autotune[{i}] {cand}"] = (dn, run)
    return calls


# --------------------------------------------------------------------------- compiling
@dataclass
class Result:
    kernel: str
    arch: int
    dtype: str
    variant: str
    tiles: str
    warps: int
    stages: int
    key: str = ""
    constexprs: dict = field(default_factory=dict)  # declared constexprs; named tuples as dicts
    regs: int = -1
    spill_bytes: int = -1
    smem: int = -1
    smem_limit: int = 0
    mma: str = ""
    loads: str = ""
    problems: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    triton: str = triton.__version__  # the version that compiled it (part of ``key`` too)


_LAUNCHES: list[Launch] = []  # read by the forked compile workers


def _mma(ptx: str) -> str:
    for name, marker in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")):
        if marker in ptx:
            return name
    return "none"


def _jsonable(v):
    return {f: _jsonable(x) for f, x in zip(v._fields, v, strict=True)} if hasattr(v, "_fields") else v


def compile_key(lc: Launch, cc: int) -> str:
    """What Triton compiles by: the source hash (the kernel and every function it calls), the
    specialized signature, constexprs and attributes; plus target, warps, stages, version."""
    src = ASTSource(lc.fn, lc.signature, lc.constexprs, lc.attrs).hash()
    return hashlib.sha256(f"{src}|sm{cc}|w{lc.num_warps}|s{lc.num_stages}|{triton.__version__}".encode()).hexdigest()


def compile_one(job: tuple[int, int]) -> Result:
    index, cc = job
    lc = _LAUNCHES[index]
    res = Result(lc.kernel, cc, lc.dtype, lc.variant(), lc.tiles(), lc.num_warps, lc.num_stages,
                 key=compile_key(lc, cc), constexprs={k: _jsonable(v) for k, v in lc.named().items()},
                 smem_limit=ARCHS[cc]["smem"], calls=list(lc.calls))
    target = GPUTarget("cuda", cc, 32)
    opts = make_backend(target).parse_options(dict(num_warps=lc.num_warps, num_stages=lc.num_stages))
    try:
        k = triton.compile(ASTSource(lc.fn, lc.signature, lc.constexprs, lc.attrs), target=target,
                           options=opts.__dict__)
    except Exception as e:
        res.problems.append(f"does not compile: {type(e).__name__}: {str(e)[:300]}")
        return res
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    res.regs, res.spill_bytes = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    res.smem = int(k.metadata.shared)
    ptx = k.asm["ptx"]
    res.mma = _mma(ptx)
    res.loads = "cp.async" if "cp.async" in ptx else "sync"
    if res.spill_bytes != 0:
        res.problems.append(f"spills {res.spill_bytes} bytes of registers" if res.spill_bytes > 0
                            else "register usage not found in the cubin")
    if res.smem > res.smem_limit:
        res.problems.append(f"needs {res.smem} bytes of shared memory, sm_{cc} has {res.smem_limit}")
    if lc.dtype != "fp32" and "UPCAST" in lc.named() and res.mma != ARCHS[cc]["mma"]:
        res.problems.append(f"multiplies without tensor cores ({res.mma}; expected {ARCHS[cc]['mma']})")
    return res


def compile_all(launches: list[Launch], arch: int, jobs: int = 1, cache: dict | None = None) -> list[Result]:
    """Compile every launch for ``arch``, ``jobs`` processes at a time; a launch whose key is in
    ``cache`` (key -> Result fields) takes the cached measurements instead."""
    global _LAUNCHES
    _LAUNCHES = launches
    results: list[Result | None] = [None] * len(launches)
    todo = []
    for i, lc in enumerate(launches):
        hit = (cache or {}).get(compile_key(lc, arch))
        if hit is None:
            todo.append((i, arch))
            continue
        measured = {k: hit[k] for k in ("regs", "spill_bytes", "smem", "mma", "loads", "problems")}
        results[i] = Result(lc.kernel, arch, lc.dtype, lc.variant(), lc.tiles(), lc.num_warps, lc.num_stages,
                            key=hit["key"], constexprs={k: _jsonable(v) for k, v in lc.named().items()},
                            smem_limit=ARCHS[arch]["smem"], calls=list(lc.calls), **measured)
    if jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            fresh = pool.map(compile_one, todo, chunksize=1)
    else:
        fresh = [compile_one(j) for j in todo]
    for (i, _), res in zip(todo, fresh, strict=True):
        results[i] = res
    print(f"sm_{arch}: {len(fresh)} compiled, {len(launches) - len(fresh)} from the cache", flush=True)
    return results


# --------------------------------------------------------------------------- the table
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
             "Regenerate: `python benchmarks/gpu_compile_report.py` under this Triton version. Spill = register "
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--archs", nargs="+", type=int, default=None,
                    help=f"compute capabilities (default: those of {sorted(ARCHS)} this triton supports)")
    ap.add_argument("--shape", default="257,256,4096",
                    help="N,H,V of the recorded calls: N odd and above two token blocks (no vocabulary split unless a "
                         "variant asks for one), H and V multiples of 16 as in real models (Triton specializes on "
                         "that, not on the sizes; small sizes keep the host-side recording fast)")
    ap.add_argument("--calls", nargs="+", default=None, help="only the calls whose name contains one of these")
    ap.add_argument("--override", default="", help="TritonConfig fields on top of the defaults, e.g. "
                                                   "block_n=128,num_warps=4 (tuning)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of gpu_compile.csv / .md / .json (the cache)")
    ap.add_argument("--no-cache", action="store_true", help="compile everything, ignoring the cache")
    ap.add_argument("--no-write", action="store_true", help="write nothing to --out (print only)")
    ap.add_argument("--json", type=Path, default=None, help="also write every result as JSON here")
    args = ap.parse_args(argv)
    archs = args.archs or supported_archs()
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        ap.error(f"unknown archs {unknown}; known: {sorted(ARCHS)}")
    shape = tuple(int(s) for s in args.shape.split(","))
    override = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in
                (kv.split("=", 1) for kv in args.override.split(",") if kv)}
    cache_path = args.out / "gpu_compile.json"
    stored_versions, stored = load_cache(cache_path)
    cache = {} if args.no_cache else {r["key"]: r for r in stored}
    results = []
    import rlad_kernels as rk

    for cc in archs:  # each family has its own tile configurations: record what the library launches there
        dtypes = args.dtypes
        calls = variants(args.groups, dtypes, shape, cc)
        if args.calls:
            calls = {n: c for n, c in calls.items() if any(s in n for s in args.calls)}
        with rk.triton_config(**override):
            launches = record(calls, cc)
        print(f"sm_{cc}: {len(launches)} distinct launches ({', '.join(args.groups)}; {', '.join(dtypes)}; "
              f"N,H,V = {shape}; triton {triton.__version__})", flush=True)
        results += compile_all(launches, cc, args.jobs, cache)
    for r in sorted(results, key=lambda r: (r.kernel, r.arch, r.dtype)):
        print(f"{'BAD ' if r.problems else 'ok  '} sm{r.arch} {r.dtype} {r.kernel:24s} {r.tiles:10s} w{r.warps} "
              f"s{r.stages} regs={r.regs:3d} spill={r.spill_bytes:4d} smem={r.smem:6d} mma={r.mma:8s} "
              f"loads={r.loads:8s} {r.variant} {'; '.join(r.problems)}")
    bad = [r for r in results if r.problems]
    print(f"{len(results)} compiled; " + ("no problems" if not bad else f"{len(bad)} with problems"))
    run = dict(environment(), archs=archs)
    rows = [asdict(r) for r in results]
    if args.json:
        args.json.write_text(json.dumps(dict(run, results=rows)))
    full = (not (args.calls or override) and set(args.groups) == set(GROUPS) and set(args.dtypes) == set(DTYPES)
            and set(archs) == set(supported_archs()) and args.shape == ap.get_default("shape"))
    if not args.no_write:
        if not full:  # its own tables only: the cache holds full default runs
            newest = max([*stored_versions, run["triton"]], key=version_order)
            written = list(write_table(rows, run, table_paths(args.out, run["triton"], newest)))
        else:
            versions, entries = merge_cache(stored_versions, stored, run, rows)
            cache_path.write_text(json.dumps(dict(versions=versions, results=entries)))
            written = [cache_path, *write_tables(versions, entries, args.out)]
        for p in written:
            print(f"wrote {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
