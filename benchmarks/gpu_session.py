"""One call on a lent GPU, worth having even if it is cut short: probe, the op tests on CUDA, the
benchmarks highest value first, the table of what Triton compiled, then more shapes while time remains.

    python3 -m benchmarks.gpu_session                 # on the GPU: everything within --budget-s (540 s)
    python3 -m benchmarks.gpu_session --dry-run       # the same steps on a CPU at small shapes (about a minute)
    python3 -m benchmarks.gpu_session --plot DIR      # here, afterwards: the plots of a session's bench.csv

Run from the repository root (the steps' child processes run there too).

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

The parts: ``session_plan`` (the steps, shapes and providers), ``session_proc`` (child processes with
deadlines, the session folder), ``session_probe``, ``session_worker`` (one benchmark step, in its own
process), ``session_report`` (summary.md, kernels.csv's columns, the plots); this module runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .harness import git_commit
from .session_plan import DRY, GPU, RESERVE_S, SHARE, plan
from .session_probe import probe
from .session_proc import ROOT, Out, run_child, slug, utc_now, write_atomic
from .session_report import KERNEL_FIELDS, plot, read_csv, summary
from .session_worker import worker

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
COMMAND = "python3 -m benchmarks.gpu_session"


class Session:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.cfg = DRY if a.dry_run else GPU
        self.t0 = time.monotonic()
        self.end = self.t0 + (a.budget_s or self.cfg["budget_s"])
        self.commit = git_commit()  # RLAD_COMMIT first: the lent machine's copy may carry a stale .git
        self.env = dict(os.environ, RLAD_COMMIT=self.commit, PYTHONUNBUFFERED="1")
        # the children run in the repository root (python -m benchmarks.gpu_session --worker ...)
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
                          budget_s=self.end - self.t0, command=f"{COMMAND} {argv}".strip(),
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
            res = run_child([sys.executable, "-m", "benchmarks.gpu_session", "--worker", json.dumps(spec)], self.env,
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
