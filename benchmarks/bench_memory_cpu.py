"""CPU memory: peak of the vocab-chunked torch path vs eager, fwd+bwd of the TRRD policy loss.

    python -m benchmarks.bench_memory_cpu              # N=4096, V=128256, H=1024, float32
    python -m benchmarks.bench_memory_cpu --N 1024 --V 32000 --H 512 --providers rlad-torch eager

Each provider runs in a fresh process. Memory is the process's resident-set high-water mark
(``VmHWM``), reset after the inputs are built (Linux ``/proc/self/clear_refs``), so the
increment is what the loss and its backward add on top of the inputs. Rows go to the same
long-format CSV as the GPU benchmarks (device ``cpu ...``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    """A field of this process's ``/proc/self/status`` in KiB (``VmRSS``: resident now, ``VmHWM``:
    the resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset this process's resident high-water mark (``VmHWM``) to its current resident set
    (Linux: ``/proc/self/clear_refs``), and return that resident set in KiB. torch's CPU allocator
    keeps no peak statistics, and ``tracemalloc`` does not see its allocations; ``VmHWM`` sees every
    page the process touches."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def child(provider: str, N: int, H: int, V: int) -> dict:
    import torch

    from .harness import Shape, make_inputs
    from .providers import policy_providers

    torch.manual_seed(0)
    shape = Shape(N=N, H=H, V=V, dtype=torch.float32)
    x = make_inputs(shape, torch.device("cpu"))
    x["hidden"].requires_grad_()
    x["weight"].requires_grad_()
    prov = {p.name: p for p in policy_providers(1024)}[provider]
    closure = prov.make(x)
    base = reset_peak()
    t0 = time.perf_counter()
    closure().backward()
    dt = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"provider": provider, "ms": dt * 1e3, "base_mib": base / 1024, "peak_mib": peak / 1024,
            "inc_mib": (peak - base) / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--providers", nargs="+", default=["rlad-torch", "eager"])
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.N, args.H, args.V)))
        return 0

    import torch

    from .harness import append_csv, env_info

    env = env_info(torch.device("cpu"))
    rows = []
    print(f"policy fwd+bwd N={args.N} H={args.H} V={args.V} float32 on {env['device']}")
    for p in args.providers:
        r = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory_cpu", "--child", p, "--N", str(args.N),
                            "--H", str(args.H), "--V", str(args.V)], capture_output=True, text=True, cwd=ROOT)
        base = dict(op="policy", provider=p, mode="full", N=args.N, H=args.H, V=args.V, dtype="float32")
        if r.returncode != 0:
            note = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1][:160]
            rows.append(dict(base, status="error", note=note))
            print(f"  {p:<14} error: {note}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(dict(base, ms_p50=round(m["ms"], 1), mem_inc_mib=round(m["inc_mib"], 1),
                         mem_peak_mib=round(m["peak_mib"], 1), status="ok",
                         note=f"CPU peak RSS (VmHWM) over {m['base_mib']:.0f} MiB of inputs; one run"))
        print(f"  {p:<14} {m['ms']:>9.0f} ms   +{m['inc_mib']:>8.1f} MiB over the inputs "
              f"(peak {m['peak_mib']:.0f} MiB)")
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {append_csv(rows, env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
