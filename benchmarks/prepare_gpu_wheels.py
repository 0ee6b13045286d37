"""Prepare, here, the wheels a lent GPU machine lacks, and print the one device command to run.

    python3 -m benchmarks.prepare_gpu_wheels

The GPU image has torch, triton, transformers and pytest-xdist but no Liger-Kernel or Cut
Cross-Entropy, and no network. Both are pure-Python wheels that need only torch and triton, so
they are downloaded here for CPython 3.12 on manylinux x86_64 into ``.whl/`` at the root of the
checkout (ignored through ``.git/info/exclude``, never committed) and travel with the device
call (``carry: [".whl"]``), where the command installs them into /tmp/site before the session.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]
DEST = ROOT / ".whl"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/*.whl && export PYTHONPATH=/tmp/site || exit;")


def device_command(commit: str) -> str:
    """The device tool's command (run from the checkout's root, with carry [".whl"], timeout_s 600)."""
    return f"{INSTALL} RLAD_COMMIT={commit} python3 -m benchmarks.gpu_session"


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python3 -m benchmarks.prepare_gpu_wheels", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    git_dir = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], capture_output=True, text=True,
                             cwd=ROOT).stdout.strip()
    if git_dir:
        exclude = (ROOT / git_dir) if not Path(git_dir).is_absolute() else Path(git_dir)
        exclude.parent.mkdir(parents=True, exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        if "/.whl/" not in text.split():
            exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + "/.whl/\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(DEST)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if subprocess.call(cmd + WHEELS) != 0:
        return 1
    wheels = sorted(DEST.glob("*.whl"))
    names = {w.name.split("-")[0].replace("_", "-").lower() for w in wheels}
    if len(names) != len(wheels):
        sys.exit(f"{DEST} holds two versions of one package ({[w.name for w in wheels]}): the install there "
                 f"would stop; delete the stale one")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {DEST}: {', '.join(w.name for w in wheels)}")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() or "unknown"
    print('device run: carry [".whl"], timeout_s 600, command:')
    print(device_command(head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
