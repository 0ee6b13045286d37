"""Compile every Triton launch of the public ops for NVIDIA GPUs, on a machine without one.

The public ops run with ``impl="triton"`` on CPU tensors while Triton's own JIT specializes
each launch exactly as it would on a GPU (a stand-in driver reports the target; Triton's real
binder builds the signature, constexprs and alignment attributes), and the compile step
records the launch instead of building it. Each distinct launch is then compiled with
``triton.compile`` for every requested architecture, and the cubin is read with the
``cuobjdump`` that ships inside the triton wheel: registers, spill stack, shared memory, the
MMA instruction the loop uses and whether its loads are pipelined.

    python benchmarks/gpu_compile_report.py                   # bf16, sm_90 and sm_80
    python benchmarks/gpu_compile_report.py --dtype fp32 --targets 80

Exit status 1 when a launch does not compile, or a 16-bit launch spills registers or has no
tensor-core MMA.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real JIT, not the interpreter (before triton is imported)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def record_launches(calls) -> dict:
    """Run ``calls`` (name -> thunk) with every Triton compile recorded instead of built."""
    launches = {}

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        launches.setdefault((self.__name__, key), (self, signature, constexprs, attrs, options))
        return None  # nothing to launch: the JIT returns before running a kernel

    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", 90, 32)))
    JITFunction._do_compile = record
    from rlad_kernels.utils import dispatch
    dispatch.triton_interpreting = lambda: True  # impl="triton" accepts CPU tensors; tile configs stay the GPU's
    for name, thunk in calls.items():
        try:
            out = thunk()
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.sum().backward()
        except Exception as e:  # host code may trip on the garbage outputs of unlaunched kernels
            print(f"note: {name}: host code raised {type(e).__name__}: {str(e)[:100]}")
    return launches


def public_calls(dt: torch.dtype, N: int, H: int, V: int) -> dict:
    """Every launch variant the public ops make: epilogue options, bias, entropy, split, kinds."""
    import rlad_kernels as rk

    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, H, dtype=dt).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H, dtype=dt).normal_(generator=g).mul_(0.02).requires_grad_()
    b = torch.zeros(V, dtype=dt, requires_grad=True)
    xt = torch.empty(N, H + 256, dtype=dt).normal_(generator=g)
    wt = torch.empty(V, H + 256, dtype=dt).normal_(generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    adv, old, tea, ref = torch.randn(N), torch.full((N,), -2.0), torch.full((N,), -2.5), torch.full((N,), -2.2)
    tw, kdw = torch.rand(N), torch.ones(N)
    P = rk.PolicyLossConfig

    def split(fn):  # the vocabulary split across programs (what small N does on a GPU), and its combine launch
        with rk.triton_config(split_v=4):
            return fn()

    policies = {
        "trrd": (P(), dict(teacher_logp=tea)),
        "grpo+dual+weights": (P(dual_clip=3.0, compute_entropy=False), dict(token_weights=tw)),
        "arithmetic+ref": (P(mixture="arithmetic", ref_kl_coef=0.1), dict(teacher_logp=tea, ref_logp=ref)),
        "kdrl-k1": (P(alpha=1.0, kd_estimator="k1", kd_coef=0.1), dict(teacher_logp=tea, kd_weights=kdw)),
        "kdrl-k2+noclamp": (P(alpha=1.0, teacher_clamp=None, kd_estimator="k2", kd_coef=0.1),
                            dict(teacher_logp=tea)),
        "kdrl-k3+entropy-bonus": (P(alpha=1.0, kd_estimator="k3", kd_coef=0.1, entropy_coef=0.01),
                                  dict(teacher_logp=tea)),
    }
    calls = {
        "logprobs": lambda: rk.linear_logprobs(x, w, y, impl="triton"),
        "logprobs+entropy+bias": lambda: sum(t.sum() for t in rk.linear_logprobs(x, w, y, bias=b,
                                                                                  return_entropy=True, impl="triton")),
        "logprobs split": lambda: split(lambda: rk.linear_logprobs(x, w, y, return_entropy=True, impl="triton")[0]),
    }
    for name, (cfg, kw) in policies.items():
        calls[f"policy {name}"] = (lambda cfg=cfg, kw=kw: rk.linear_policy_loss(x, w, y, adv, old, config=cfg,
                                                                                impl="triton", **kw).loss)
    calls["policy trrd split"] = lambda: split(lambda: rk.linear_policy_loss(x, w, y, adv, old, teacher_logp=tea,
                                                                             impl="triton").loss)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        calls[f"divergence {kind}"] = (lambda kind=kind: rk.linear_divergence(x, w, xt, wt, kind=kind,
                                                                              impl="triton"))
    for kind in ("reverse_kl", "jsd"):
        calls[f"divergence {kind} split+bias"] = (lambda kind=kind: split(lambda: rk.linear_divergence(
            x, w, xt, wt, student_bias=b, kind=kind, impl="triton")))
    return calls


def flags_of(constexprs: dict) -> str:
    """The launch's option constexprs, compactly (tile sizes and precision left out)."""
    out = []
    for _, v in sorted(constexprs.items(), key=lambda kv: str(kv[0])):
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            on = [f for f, x in zip(v._fields, v, strict=True) if x not in (False, 0, None)]
            out.append(f"{type(v).__name__}({','.join(on)})")
    return " ".join(out)


def compile_report(launches: dict, targets, fp32: bool):
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    rows, bad = [], 0
    for (name, _), (fn, signature, constexprs, attrs, options) in sorted(launches.items(), key=lambda kv: kv[0][0]):
        named = {fn.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
        for cc in targets:
            target = GPUTarget("cuda", cc, 32)
            opts = make_backend(target).parse_options(dict(num_warps=options.num_warps,
                                                           num_stages=options.num_stages))
            label = f"sm{cc} {name:24s} warps={options.num_warps} stages={options.num_stages}"
            try:
                k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
            except Exception as e:
                print(f"FAIL  {label}: {type(e).__name__}: {str(e)[:300]}")
                bad += 1
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                res = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", res)
            regs, stack = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
            ptx = k.asm["ptx"]
            mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
            pipe = "cp.async" if "cp.async" in ptx else "sync-loads"
            has_dot = "UPCAST" in named  # kernels that multiply tiles
            problem = (not fp32) and (stack > 0 or (has_dot and mma == "none"))
            bad += problem
            print(f"{'BAD ' if problem else 'ok  '}  {label} regs={regs:3d} stack={stack:4d} "
                  f"smem={k.metadata.shared:6d} mma={mma:8s} loads={pipe:10s} {flags_of(constexprs)}")
            rows.append((name, cc, regs, stack, k.metadata.shared, mma, pipe))
    return rows, bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--targets", default="90,80", help="comma-separated compute capabilities")
    ap.add_argument("--shape", default="1000,1024,32000",
                    help="N,H,V of the recorded calls (H and V aligned as in real models, N odd)")
    args = ap.parse_args(argv)
    N, H, V = map(int, args.shape.split(","))
    launches = record_launches(public_calls(DTYPES[args.dtype], N, H, V))
    print(f"{len(launches)} distinct launches recorded ({args.dtype}, N,H,V = {N},{H},{V}, "
          f"triton {triton.__version__})")
    rows, bad = compile_report(launches, [int(t) for t in args.targets.split(",")], args.dtype == "fp32")
    print(f"{len(rows)} compiled; " + ("no problems" if not bad else f"{bad} problem(s)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
