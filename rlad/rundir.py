"""The run directory (``out_dir``): one trainer at a time, and no run lost to another.

* ``check_out_dir``: before any work, ``out_dir`` must be a folder (or creatable), and the names
  the run writes must not be taken by something of the wrong kind (``checkpoints`` a file, ...).
* ``RunLock``: ``out_dir/rlad.lock``, held with ``fcntl.flock`` for the life of the run and
  holding the holder's PID, host and start time. A second trainer in the same folder (a requeued
  job) is refused with the holder named. The kernel drops the lock when its process dies, even by
  SIGKILL, so a lock file left by a dead run is stale: the next run takes it over, saying so. On a
  filesystem without ``flock``, the PID and host in the file decide instead.
* ``prepare``: under the lock, removes the temporary files a crashed run left, and refuses to
  start a new run in a folder that holds an earlier one (``RUN_FILES`` with something recorded)
  unless it resumes it (``resume``) or deletes it first (``overwrite``; other files in the
  folder are left alone).
* ``write_atomic``: small outputs (config, summary, plot) are written to a temporary file and
  renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK = "rlad.lock"
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "summary.md", "curves.png", "checkpoints")
_LEGACY_TEMPS = ("metrics.tmp",)  # written by MetricsLog.rewind before it truncated in place


class RunDirError(ValueError):
    """The run directory cannot be used as asked (in use, holds another run, not a folder)."""


def check_out_dir(out_dir) -> None:
    """``out_dir`` is a folder or can be made one, and its run files' names are free or of the
    right kind; no file is created. Raises ``RunDirError`` naming the path and the fix."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: is a file, not a folder; choose another out_dir")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: cannot write in {existing} (read-only or permission "
                          f"denied); choose another out_dir")
    for name in RUN_FILES:
        p = out / name
        wrong = p.exists() and (not p.is_dir() if name == "checkpoints" else p.is_dir())
        if wrong:
            kind = "a file" if name == "checkpoints" else "a folder"
            raise RunDirError(f"config: out_dir={str(out_dir)!r}: {p} is {kind}, where the run writes its {name}; "
                              f"move it away or choose another out_dir")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ----------------------------------------------------------------------------- the lock
def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(info: dict) -> str:
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(out_dir):`` hold the run directory's lock (see the module docstring).
    ``taken_over`` is the stale holder's record when a dead run's lock was taken over."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.path = self.out / LOCK
        self.fd: int | None = None
        self.taken_over: dict | None = None

    def acquire(self) -> RunLock:
        self.out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                raise RunDirError(f"out_dir {self.out} is in use by another rlad run ({_describe(info)}; lock file "
                                  f"{self.path}); wait for it to end or stop it, or choose another --out-dir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    os.close(fd)
                    raise
                self._check_without_flock(fd)  # a filesystem without flock: the PID and host decide
            # the previous holder may have removed the file between our open and our lock: then
            # ours is a lock on a deleted file, and another run may lock a new one; start again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        previous = self._read(fd)
        if previous:
            self.taken_over = previous
            print(f"out_dir {self.out}: took over the stale lock of {_describe(previous)}: that run is no longer "
                  f"running", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    def _check_without_flock(self, fd: int) -> None:
        info = self._read(fd)
        if not info or not _pid_alive(info.get("pid")) and info.get("host") == socket.gethostname():
            return
        os.close(fd)
        raise RunDirError(f"out_dir {self.out} may be in use by another rlad run ({_describe(info)}; its filesystem "
                          f"has no file locks, so this cannot be checked): if that run has ended, delete {self.path}")

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0)
            info = json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
        return info if isinstance(info, dict) else {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # remove the file while still holding the lock (see acquire); only if it is still ours
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- the folder
def _temporaries(out: Path) -> list[Path]:
    """Temporary files and folders of interrupted writes: under the lock, none is in use."""
    found = [p for p in out.glob(".*.tmp-*") if p.name.split(".tmp-")[0][1:] in RUN_FILES]
    found += [out / name for name in _LEGACY_TEMPS if (out / name).exists()]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += [p for p in ckpts.glob(".step_*.tmp-*")]
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def earlier_run(out_dir) -> list[str]:
    """The names of ``RUN_FILES`` present in ``out_dir`` when they hold an earlier run's outputs:
    a ``config.json`` with an empty or absent ``metrics.jsonl`` and no checkpoint is only a start
    that failed before recording anything (it is replaced), not a run."""
    out = Path(out_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    recorded = [name for name in found if name != "config.json" and not _empty(out / name)]
    return found if recorded else []


def _empty(p: Path) -> bool:
    """An empty file, or a folder with nothing but empty folders in it."""
    if p.is_dir() and not p.is_symlink():
        return all(_empty(q) for q in p.iterdir())
    return p.is_file() and p.stat().st_size == 0


def prepare(out_dir, *, resume: bool, overwrite: bool) -> None:
    """Under the lock: clean up temporaries of a crash; refuse a folder that holds an earlier run
    unless ``resume`` (continue it) or ``overwrite`` (delete its ``RUN_FILES`` first)."""
    out = Path(out_dir)
    temps = _temporaries(out)
    for p in temps:
        _remove(p)
    if temps:
        print(f"out_dir {out}: removed {len(temps)} temporary file(s) of an interrupted run: "
              f"{', '.join(str(p.relative_to(out)) for p in temps)}", flush=True)
    found = earlier_run(out)
    if not found or resume:
        return
    if overwrite:
        for name in found:
            _remove(out / name)
        print(f"out_dir {out}: overwrite: deleted the earlier run's {', '.join(found)}", flush=True)
        return
    raise RunDirError(f"out_dir {out} holds an earlier run ({', '.join(found)}); continue it with --resume true, "
                      f"delete it and start over with --overwrite true, or choose another --out-dir")


def write_atomic(path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced, renamed into place."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds,
    removed when it fails. An OSError names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror or e}: cannot write {path}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
