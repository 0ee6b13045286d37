"""Compile every Triton launch of the public ops for NVIDIA GPUs, on a machine without one.

The public ops run with ``impl="triton"`` on CPU tensors while Triton's own JIT specializes
each launch exactly as it would on a GPU (a stand-in driver reports the target; Triton's real
binder builds the signature, the constexprs and the alignment attributes), and the compile
step records the launch instead of building it. Each distinct launch is then compiled with
``triton.compile`` for every requested architecture, and the cubin is read with the
``cuobjdump`` that ships inside the triton wheel: registers, spill stack, shared memory, the
tensor-core instruction the loop uses and whether its loads are pipelined.

    python -m benchmarks.gpu_compile_report                  # the tables -> benchmarks/results/gpu_compile*.{csv,md}
    python -m benchmarks.gpu_compile_report --archs 80 --dtypes fp32 --no-write

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

The parts: ``compile_variants`` (the calls), ``compile_launches`` (recording their launches),
``compile_cubins`` (compiling them, reading the cubins, the cache look-up), ``compile_tables`` (the
cache file and the tables); this module runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real JIT, not the interpreter (before triton is imported)

import triton  # noqa: E402

from .compile_cubins import ARCHS, compile_all, supported_archs  # noqa: E402
from .compile_launches import record  # noqa: E402
from .compile_tables import (  # noqa: E402
    COMMAND,
    environment,
    load_cache,
    merge_cache,
    table_paths,
    version_order,
    write_table,
    write_tables,
)
from .compile_variants import DTYPES, variants  # noqa: E402

GROUPS = ("standard", "epilogue", "autotune")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
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
