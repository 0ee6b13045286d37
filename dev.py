#!/usr/bin/env python3
"""One command per job on a fresh machine with only python3: it sets up what the job needs, then runs it.

    python3 dev.py demo      # the built-in demo (CPU, a few minutes)
    python3 dev.py test      # the test suite (Triton kernels run in Triton's CPU interpreter)
    python3 dev.py lint      # ruff, as CI runs it

Setup, done once and skipped when nothing changed (safe to re-run, or to interrupt and re-run):
a virtual environment in ``.venv`` (``RLAD_VENV`` overrides), the CPU build of torch first (an
unpinned ``torch`` would pull the CUDA wheels), then this project in editable mode: with its
``train`` extra (the trainer's dependencies) for the demo, with the ``dev`` and ``trl`` extras too
for the tests, with ``dev`` for the linter. Extra arguments go to
the job (``python3 dev.py test -k trl``, ``python3 dev.py demo --seed 1``). The exit status is
the job's (pytest's 5, "no tests collected", included).

torch comes from a local wheel when pip is configured with one (``--no-index``: find-links
only), else from PyTorch's CPU index (``RLAD_TORCH_INDEX`` overrides). For a GPU machine, see
the README ("On a GPU machine"): install your CUDA build of torch yourself, then the project.

Standard library only: this file runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("RLAD_VENV", ROOT / ".venv"))
if not VENV.is_absolute():
    VENV = ROOT / VENV
TORCH = os.environ.get("RLAD_TORCH", "torch==2.13.0")
TORCH_INDEX = os.environ.get("RLAD_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
STAMP = VENV / ".rlad-setup.json"
EXTRAS = {"demo": "train", "test": "train,dev,trl", "lint": "dev"}


def say(msg: str) -> None:
    print(f"[dev.py] {msg}", flush=True)


def bin_path(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def run(cmd: list, **kw) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def must(cmd: list, what: str) -> None:
    if run(cmd) != 0:
        sys.exit(f"[dev.py] {what} failed (command: {' '.join(map(str, cmd))}); fix the cause and re-run")


def fingerprint() -> str:
    """What the installed environment depends on: the project's metadata and the torch pin."""
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    h.update(TORCH.encode())
    return h.hexdigest()


def installed() -> dict:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}


def make_venv() -> None:
    if bin_path("python").exists():
        return
    say(f"creating the virtual environment {VENV}")
    try:
        venv.EnvBuilder(with_pip=True).create(VENV)
    except (subprocess.CalledProcessError, OSError) as err:
        sys.exit(f"[dev.py] could not create {VENV} ({err}); on Debian/Ubuntu install python3-venv first")


def install_torch(py: Path) -> None:
    if run([py, "-c", f"import importlib.metadata as m, sys; v = m.version('torch'); "
                      f"sys.exit(0 if '{TORCH}'.endswith('=' + v.split('+')[0]) else 1)"],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        return
    say(f"installing {TORCH} (CPU build)")
    # a local wheel first (pip's find-links, no index: fails fast where there is none), its
    # dependencies from the configured index; else PyTorch's CPU index
    if run([py, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", TORCH],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        must([py, "-m", "pip", "install", "--quiet", TORCH], "installing torch's dependencies")
    else:
        must([py, "-m", "pip", "install", "--quiet", TORCH, "--index-url", TORCH_INDEX],
             f"installing {TORCH} from {TORCH_INDEX}")


def setup(job: str) -> None:
    make_venv()
    py = bin_path("python")
    want = set(filter(None, EXTRAS[job].split(",")))
    state = installed()
    if state.get("fingerprint") == fingerprint() and want <= set(state.get("extras", [])):
        return
    install_torch(py)
    extras = sorted(want | set(state.get("extras", []) if state.get("fingerprint") == fingerprint() else []))
    target = "." + (f"[{','.join(extras)}]" if extras else "")
    say(f"installing the project ({target}, editable)")
    must([py, "-m", "pip", "install", "--quiet", "-e", target], "installing the project")
    STAMP.write_text(json.dumps({"fingerprint": fingerprint(), "extras": extras}))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__.strip().split("\n\n")[1])
        return 2
    job, rest = argv[0], argv[1:]
    setup(job)
    if job == "demo":
        return run([bin_path("rlad"), "demo", *rest])
    if job == "lint":
        return run([bin_path("ruff"), "check", ".", *rest])
    return run([bin_path("python"), "-m", "pytest", "-q", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
