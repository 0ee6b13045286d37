"""The run directory (``out_dir``): rlad writes only into folders it made, one trainer at a
time, and no run is lost to another.

* The marker: ``rlad-run.json`` (a format version, a run id, the kind of folder: a training run,
  a demo or a study), written by rlad alone when it starts in a new or empty folder. Only a
  folder with the marker is ever resumed, overwritten or cleaned, and then only the files rlad
  lists as its own (``RUN_FILES``; in ``checkpoints/`` only ``step_NNNNNN`` folders). Any other
  non-empty folder is refused before any work (``check_out_dir``), and so is an out_dir that is,
  or holds, one of the run's inputs (a model, the tokenizer, the task file, the config file).
* ``check_out_dir``: before any work, ``out_dir`` must be a folder (or creatable), new, empty
  or rlad's, and the names the run writes must not be taken by something of the wrong kind.
* ``RunLock``: ``out_dir/rlad.lock``, held with ``fcntl.flock`` for the life of the run and
  holding the holder's PID, host and start time. A second trainer in the same folder (a requeued
  job) is refused with the holder named. The kernel drops the lock when its process dies, even by
  SIGKILL, so a lock file left by a dead run is stale: the next run takes it over, saying so. On a
  filesystem without ``flock``, the PID and host in the file decide instead.
* ``prepare``: under the lock, writes the marker into a new folder, removes the temporary files
  a crashed run left, and refuses to start a new run in a folder that holds an earlier one
  (``RUN_FILES`` with something recorded) unless it resumes it (``resume``) or deletes it first
  (``overwrite``: rlad's own files only; anything else in the folder is left alone).
* ``write_atomic`` / ``atomic_path`` / ``staged_folder``: outputs are written to a temporary
  file or folder beside their place and renamed into it, so a crash never leaves a half-written
  one and never destroys the previous one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from .signals import check_writer

LOCK = "rlad.lock"
MARKER = "rlad-run.json"
MARKER_FORMAT = 1
KINDS = {"run": "a training run", "demo": "an rlad demo", "study": "an rlad study"}
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "summary.md", "curves.png", "checkpoints")
STEP = re.compile(r"^step_(\d{6,})$")  # a checkpoint's folder in checkpoints/
_CHECKPOINT = re.compile(r"^step_\d{6,}(\.\d+)?$")  # also a set-aside one (step_000003.2)
UNUSABLE = "unusable"  # checkpoints/unusable/: damaged checkpoints set aside (rlad/checkpoint.py)
STUDY_FILES = ("run.yaml", "train.log")  # what rlad study writes in a run's folder beside the run's files
_LEGACY_TEMPS = ("metrics.tmp",)  # written by MetricsLog.rewind before it truncated in place


class RunDirError(ValueError):
    """The run directory cannot be used as asked (in use, holds another run, not a folder)."""


def check_out_dir(out_dir, inputs: dict[str, str | None] | None = None, *, kind: str = "run") -> None:
    """``out_dir`` can hold a run and rlad may write there: not empty as a setting, a folder or
    creatable, writable, not one of the run's ``inputs`` (setting -> path) nor holding one, new,
    empty or rlad's own folder of this ``kind``, and its run files' names are free or of the right
    kind; no file is created. Raises ``RunDirError`` naming the path and the fix."""
    if not str(out_dir).strip():
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: empty; name the output folder (an empty name would "
                          f"be the current directory)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: is a file, not a folder; choose another out_dir")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: cannot write in {existing} (read-only or permission "
                          f"denied); choose another out_dir")
    check_inputs(out_dir, inputs or {})
    if problem := owner_problem(out, kind):
        raise RunDirError(f"config: out_dir={str(out_dir)!r}: {problem}")
    for name in RUN_FILES:
        p = out / name
        wrong = p.exists() and (not p.is_dir() if name == "checkpoints" else p.is_dir())
        if wrong:
            kind = "a file" if name == "checkpoints" else "a folder"
            raise RunDirError(f"config: out_dir={str(out_dir)!r}: {p} is {kind}, where the run writes its {name}; "
                              f"move it away or choose another out_dir")


def check_inputs(out_dir, inputs: dict[str, str | None], *, setting: str = "config: out_dir") -> None:
    """``out_dir`` is not, and does not hold, any of ``inputs`` (a name -> a local path; absent
    paths, hub ids and presets are skipped): an overwrite, a checkpoint prune or an export there
    could delete or replace it."""
    here = Path(out_dir).resolve()
    for name, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        there = Path(path).resolve()
        if there == here or here in there.parents:
            raise RunDirError(f"{setting}={str(out_dir)!r}: {'is' if there == here else 'holds'} the {name} {path}; "
                              f"rlad never writes where its inputs are: choose another folder")


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


def lock_holder(out_dir) -> dict | None:
    """The record (PID, host, start) of the process holding ``out_dir``'s lock, or None when no
    live process holds it (no lock file, or a stale one). Probes with a shared lock, released at once."""
    path = Path(out_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return RunLock._read(fd) or {"pid": "?", "host": "?", "started": "?"}
    except OSError:  # no flock on this filesystem: RunLock decides by the PID when the run starts
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(info: dict) -> str:
    """The lock holder, and whether it is still running on this host (an orphan, perhaps)."""
    text = _describe(info)
    if info.get("host") == socket.gethostname() and _pid_alive(info.get("pid")):
        text += f"; it is still running: stop it with `kill {info.get('pid')}`"
    return text


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
                raise RunDirError(f"out_dir {self.out} is in use by another rlad run ({describe_holder(info)}; lock "
                                  f"file {self.path}); wait for it to end or stop it, or choose another --out-dir"
                                  ) from None
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
        check_writer(f"the lock {self.path}")  # a forked copy of the holder never removes its lock
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


# ----------------------------------------------------------------------------- the marker
def read_marker(out_dir) -> dict | None:
    """The marker of ``out_dir``, or None when it has none. A marker rlad cannot read (damaged,
    or of another format) is a ``RunDirError``: the folder is then not known to be rlad's."""
    p = Path(out_dir) / MARKER
    if not p.exists() and not p.is_symlink():
        return None
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{p}: cannot read this rlad marker ({type(e).__name__}: {e}); rlad does not touch a "
                          f"folder it cannot prove its own: choose another folder") from None
    if not isinstance(info, dict) or info.get("format") != MARKER_FORMAT or info.get("kind") not in KINDS:
        raise RunDirError(f"{p}: not an rlad marker of format {MARKER_FORMAT} (kind one of {', '.join(KINDS)}); "
                          f"rlad does not touch a folder it cannot prove its own: choose another folder")
    return info


def _vacant(out: Path) -> bool:
    """Absent, empty, or holding only what an rlad start that died before writing its marker
    left: the lock file and the marker's temporary file."""
    if not out.is_dir():
        return not out.exists()
    return all(p.name == LOCK or p.name.startswith(f".{MARKER}.tmp-") for p in out.iterdir())


def owner_problem(out_dir, kind: str) -> str | None:
    """Why rlad may not use ``out_dir`` as a folder of ``kind`` (None when it may): it is not
    empty and has no marker (someone else's), or its marker is of another kind."""
    out = Path(out_dir)
    if _vacant(out):
        return None
    info = read_marker(out)
    if info is None and kind == "run" and _unmarked_run(out):
        return None
    if info is None:
        return (f"{out} is not empty and is not a folder rlad made (it has no {MARKER}); rlad writes only into a new "
                f"or empty folder or one of its own, and never deletes what it did not write: choose another folder")
    if info["kind"] != kind:
        return f"{out} holds {KINDS[info['kind']]}, not {KINDS[kind]}: choose another folder"
    return None


def claim(out_dir, kind: str = "run", *, setting: str = "out_dir") -> dict:
    """Make ``out_dir`` a folder of rlad's of ``kind``: create it with a new marker when it is
    absent or empty; return its marker. ``RunDirError`` (naming ``setting``) when it is someone
    else's, or rlad's of another kind."""
    out = Path(out_dir)
    if problem := owner_problem(out, kind):
        raise RunDirError(f"{setting} {problem}")
    info = read_marker(out)
    if info is None:
        adopted = not _vacant(out)  # a run of an rlad from before the marker (owner_problem allowed it)
        out.mkdir(parents=True, exist_ok=True)
        info = _write_marker(out, kind)
        if adopted:
            print(f"{setting} {out}: a run written before rlad marked its folders; marked it as rlad's "
                  f"({MARKER})", flush=True)
    return info


def _unmarked_run(out: Path) -> bool:
    """A run folder of an rlad from before the marker: its ``config.json`` holds rlad's settings
    with this very folder as ``out_dir``, and nothing in it has a name rlad does not write there.
    No one else's folder has that config.json: a model's config.json names no out_dir."""
    try:
        saved = json.loads((out / "config.json").read_text())
        same = isinstance(saved, dict) and {"algo", "student", "steps", "seed"} <= saved.keys() and \
            Path(saved["out_dir"]).resolve() == out.resolve()
    except (OSError, ValueError, TypeError, KeyError):
        return False
    known = {*RUN_FILES, LOCK, *STUDY_FILES, *_LEGACY_TEMPS}
    return same and all(p.name in known or p.name.startswith(".") and ".tmp-" in p.name for p in out.iterdir())


def _write_marker(out: Path, kind: str) -> dict:
    from rlad_kernels import __version__

    info = {"format": MARKER_FORMAT, "kind": kind, "run_id": uuid.uuid4().hex,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "rlad": __version__}
    write_atomic(out / MARKER, json.dumps(info, indent=2) + "\n")
    return info


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


def _own(out: Path) -> list[Path]:
    """What rlad wrote in a run folder (``RUN_FILES``; of ``checkpoints/``, only its
    ``step_NNNNNN`` folders), in ``RUN_FILES`` order: what an overwrite may delete."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if name == "checkpoints":
            for folder in (p, p / UNUSABLE):  # checkpoints, and the damaged ones set aside
                if folder.is_dir() and not folder.is_symlink():
                    found += sorted(q for q in folder.iterdir() if _CHECKPOINT.match(q.name))
        elif p.exists() or p.is_symlink():
            found.append(p)
    return found


def earlier_run(out_dir) -> list[str]:
    """The names of ``RUN_FILES`` present in ``out_dir`` when they hold an earlier run's outputs:
    a ``config.json`` with an empty or absent ``metrics.jsonl`` and no checkpoint is only a start
    that failed before recording anything (it is replaced), not a run."""
    out = Path(out_dir)
    own = _own(out)
    found = list(dict.fromkeys(p.relative_to(out).parts[0] for p in own))
    recorded = [p for p in own if p.name != "config.json" and not _empty(p)]
    return found if recorded else []


def _empty(p: Path) -> bool:
    """An empty file, or a folder with nothing but empty folders in it."""
    if p.is_dir() and not p.is_symlink():
        return all(_empty(q) for q in p.iterdir())
    return p.is_file() and p.stat().st_size == 0


def prepare(out_dir, *, resume: bool, overwrite: bool) -> None:
    """Under the lock: make a new or empty folder rlad's (the marker) and refuse anyone else's;
    clean up temporaries of a crash; refuse a folder that holds an earlier run unless ``resume``
    (continue it) or ``overwrite`` (delete rlad's files of it first, and nothing else)."""
    out = Path(out_dir)
    claim(out, "run")  # checked before any work too (check_out_dir); again here, under the lock
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
        own = _own(out)
        for p in own:
            _remove(p)
        for folder in (out / "checkpoints" / UNUSABLE, out / "checkpoints"):  # when nothing else is left in them
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
        _write_marker(out, "run")  # a new run: a new run id
        print(f"out_dir {out}: overwrite: deleted the earlier run's {', '.join(found)} "
              f"({len(own)} file(s) and folder(s) rlad wrote; nothing else)", flush=True)
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
    check_writer(str(path))
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


@contextlib.contextmanager
def staged_folder(path, *, replace: bool = False):
    """A temporary folder path beside ``path`` (not yet created) to write a whole folder into;
    renamed onto ``path`` when the block succeeds and removed when it fails, so ``path`` is never
    half-written. ``path`` must then be absent or empty, or, with ``replace``, it is moved aside,
    the new folder renamed into place, and the old one deleted. An OSError names ``path``."""
    path = Path(path)
    check_writer(str(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for p in (tmp, old):
        if p.exists() or p.is_symlink():
            _remove(p)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        if path.exists() or path.is_symlink():
            if not replace:
                raise FileExistsError(errno.EEXIST, f"{path} appeared while it was being written")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if tmp.exists():
                _remove(tmp)
        if isinstance(e, shutil.Error):  # its message is the list of every file that failed
            first = e.args[0][0] if e.args and e.args[0] and isinstance(e.args[0], list) else e
            raise OSError(f"cannot write {path}: {first[-1] if isinstance(first, tuple) else first} (and "
                          f"{max(len(e.args[0]) - 1, 0) if isinstance(e.args[0], list) else 0} more)") from None
        if isinstance(e, OSError) and not str(e).endswith(f"cannot write {path}"):
            raise OSError(e.errno, f"{e.strerror or e}: cannot write {path}") from e
        raise
