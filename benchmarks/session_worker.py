"""One benchmark step of the GPU session, in its own process (``python -m benchmarks.gpu_session
--worker SPEC``): one op's shapes in order through ``run.sweep`` with the step's deadline, a
``torch.profiler`` breakdown of ours at each shape, and a dump of what Triton compiled there."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .session_plan import OURS
from .session_proc import write_atomic
from .session_report import read_csv


def worker(spec: dict) -> int:
    """One benchmark step (one op, its shapes in order) in this process, through ``run.sweep`` with
    the step's deadline; the providers' history is what bench.csv already holds for this op. The
    kernels Triton compiled are dumped to spec['dump'] after each shape."""
    import torch

    from . import run as runmod
    from .harness import Shape, env_info

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

