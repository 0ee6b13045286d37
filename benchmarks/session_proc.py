"""The GPU session's child processes and its folder: each step runs as a process group with a
deadline (SIGINT at the deadline, SIGKILL 10 s later), its output going to ``session.log`` or a log
of its own; files are rewritten atomically as results come."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Out:
    def __init__(self, folder: Path, t0: float):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = t0
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.dir / name

    def log(self, line: str) -> None:
        text = f"[{time.monotonic() - self.t0:6.1f}s] {line}"
        with self._lock:
            print(text, flush=True)
            with self.path("session.log").open("a") as f:
                f.write(text + "\n")


def run_child(cmd: list[str], env: dict, deadline: float, out: Out, tag: str, log_file: Path | None = None) -> dict:
    """Run ``cmd`` in its own process group until it ends or ``deadline`` (monotonic) passes: then
    SIGINT, and SIGKILL 10 s later. Its output lines go to session.log (prefixed) or to ``log_file``."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    tail: list[str] = []

    def pump():
        sink = log_file.open("a") if log_file else None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-40]
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
                else:
                    out.log(f"{tag}: {line}")
        finally:
            if sink:
                sink.close()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = None
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        stopped = "time limit"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return dict(rc=proc.returncode, seconds=round(time.monotonic() - t, 1), stopped=stopped, tail=tail[-15:])

