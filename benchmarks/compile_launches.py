"""Recording the Triton launches of the public ops without a GPU: the ops run with ``impl="triton"``
on CPU tensors while Triton's own JIT specializes each launch exactly as it would on a GPU (a
stand-in driver reports the target; Triton's real binder builds the signature, the constexprs and
the alignment attributes), and the compile step records the launch instead of building it.

Needs Triton's JIT, not its interpreter: ``TRITON_INTERPRET=0`` before ``rlad_kernels`` is imported
(``python -m benchmarks.gpu_compile_report`` sets it).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass, field

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


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


def import_the_ops() -> None:
    """Import every module of ``rlad_kernels.ops`` now, before ``record`` makes
    ``dispatch.triton_interpreting`` say True: a module that binds the name when it is imported
    (``from ...utils.dispatch import triton_interpreting``: the launch options, e.g. ``UPCAST`` and
    the staged dW GEMM) must keep the real function, False under Triton's JIT, so the options stay a
    GPU's; only dispatch's own look-up (``impl="triton"`` on CPU tensors) is to see True. Without
    this, a module first imported inside a recorded call (the package loads its public names on first
    use) records the interpreter's launches: fp32 dots, no tensor cores."""
    import rlad_kernels.ops

    for info in pkgutil.walk_packages(rlad_kernels.ops.__path__, "rlad_kernels.ops."):
        importlib.import_module(info.name)


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

    import_the_ops()
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

