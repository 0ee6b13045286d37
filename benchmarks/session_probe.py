"""The GPU session's first step: the device, the driver and the package versions, read in a child
process (the session process itself never touches CUDA)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

from .session_proc import ROOT

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

