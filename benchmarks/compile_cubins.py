"""Compiling each recorded launch with ``triton.compile`` for a GPU architecture and reading the
cubin with the ``cuobjdump`` that ships inside the triton wheel: registers, spill stack, shared
memory, the tensor-core instruction the loop uses and whether its loads are pipelined; a launch
whose key (what Triton compiles by) is in the cache takes the cached measurements instead."""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from .compile_launches import Launch

# per architecture: the most dynamic shared memory one block may use, and the tensor-core
# instruction a 16-bit tl.dot must become
ARCHS = {
    80: dict(smem=166912, mma="mma.sync"),   # A100
    90: dict(smem=232448, mma="wgmma"),      # H100 / H200
    100: dict(smem=232448, mma="tcgen05"),   # B200
}


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

