"""Stop means stop: how rlad's processes end when they are told to, and never outlive the
process that started them.

* ``graceful_stop()``: while a trainer (or a study) runs, SIGTERM and SIGINT raise ``Stopped``
  (a ``KeyboardInterrupt``) in the main thread, so every ``finally`` runs: the run folder's lock
  is released, temporary files are removed, and the command's last line says where to resume
  from; the exit code is ``128 + signal`` (130, 143), as a shell reports a signal's death.
* ``finish_first()``: a checkpoint write is not cut in half. A stop signal during the block is
  held until the write has finished (and then raised); a second one abandons the write at once
  (its temporary folder is removed) so a hung filesystem cannot hold the stop forever.
* ``die_with_parent()``: on Linux a child started by rlad (a study's ``rlad train``, a
  relaunch's torchrun, torchrun's ranks) gets SIGTERM when its parent dies, even by SIGKILL
  (``PR_SET_PDEATHSIG``): no orphan keeps training, holding a run's lock. ``PARENT_PID`` in the
  environment names the parent the child expects; a parent already gone is caught too.
* ``own_writes()`` / ``check_writer()``: only the trainer's own process writes metrics,
  checkpoints and the run's files. A process forked inside it (by a reward function, say) that
  reaches a write is ended there, without writing, instead of running a second trainer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_PID = "RLAD_PARENT_PID"  # set by rlad for a child it starts: the PID of that parent
PR_SET_PDEATHSIG = 1  # linux/prctl.h
GRACE_S = 60.0  # how long a stopped parent waits for its children to stop before it kills them


class Stopped(KeyboardInterrupt):
    """The process was told to stop by ``signum`` (SIGTERM, SIGINT)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.where = ""  # what the stopped command has to say about where it stopped (one line)
        super().__init__(f"stopped by {name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_deferring = 0
_pending: int | None = None


def _handler(signum, frame):
    global _pending
    if _deferring and _pending is None:  # the first one waits for the write to finish
        _pending = signum
        print(f"{name(signum)}: finishing the checkpoint being written, then stopping (send it again to abandon "
              f"the write)", file=sys.stderr, flush=True)
        return
    raise Stopped(signum)


@contextlib.contextmanager
def graceful_stop():
    """SIGTERM and SIGINT raise ``Stopped`` in the main thread inside the block (the previous
    handlers come back after it). Outside the main thread (a trainer embedded in another
    program's worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def finish_first():
    """Hold a stop signal until the block is done (see the module docstring)."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    except BaseException:  # the block failed, or a second signal abandoned it: that ends the run
        _deferring -= 1
        if not _deferring:
            _pending = None
        raise
    _deferring -= 1
    if not _deferring and _pending is not None:  # the block finished: now stop
        signum, _pending = _pending, None
        raise Stopped(signum)


def stop_children(procs, signum: int, grace_s: float = GRACE_S) -> None:
    """Pass ``signum`` to each of ``procs`` (``subprocess.Popen``), wait ``grace_s`` for them all
    (an rlad run stops within a step, or after the checkpoint it is writing), then kill the rest;
    told to stop again meanwhile, kill them at once."""
    import subprocess
    import time

    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, Stopped) as why:
            if isinstance(why, Stopped):
                deadline = 0.0
            proc.kill()
            proc.wait()


def die_with_parent(expected_parent: int | None = None) -> None:
    """Linux: this process receives SIGTERM when its parent dies (``PR_SET_PDEATHSIG``). With
    ``expected_parent``, a parent that is already gone (the child was re-parented before this
    call) stops this process at once. Elsewhere: nothing (no portable equivalent)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGTERM)


def child_environment() -> dict[str, str]:
    """The environment for a child rlad starts: this one, with ``PARENT_PID`` naming this process."""
    return {**os.environ, PARENT_PID: str(os.getpid())}


def adopt_parent() -> None:
    """At the start of an rlad command: die with the parent that started it, when it is rlad
    (``PARENT_PID``) or torchrun (a rank: its parent is torchrun's agent). The variable is removed,
    so this process's own children do not mistake it for their parent's."""
    expected = os.environ.pop(PARENT_PID, None)
    if expected is not None and expected.isdigit():
        die_with_parent(int(expected))
    elif os.environ.get("TORCHELASTIC_RUN_ID"):  # a rank under torchrun
        die_with_parent()


_writer: int | None = None


def own_writes() -> None:
    """This process is the trainer: from now on only it may write the run's files."""
    global _writer
    _writer = os.getpid()


def check_writer(what: str) -> None:
    """Before a write of ``what``: a process forked from the trainer (inside a reward function,
    say) ends here, at once and without writing; the trainer goes on."""
    if _writer is not None and os.getpid() != _writer:
        print(f"rlad: process {os.getpid()}, forked from the trainer {_writer} (by a reward function?), reached a "
              f"write of {what}; it exits without writing", file=sys.stderr, flush=True)
        os._exit(70)
