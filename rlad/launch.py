"""How a run starts, in its process or processes: ``train(cfg)`` checks everything before any
work (``preflight``), locks and prepares the output folder, picks the checkpoint to resume from
and runs the loop (``rlad/train.py``); under torchrun it joins the process group first, and rank 0
alone locks and prepares the folder. ``relaunch`` is ``rlad train --nproc N``: the same command
again under torchrun, stopped with this process. SIGTERM / SIGINT end a run gracefully, and its
last line says where to resume (``rlad/signals.py``).
"""

from __future__ import annotations

import dataclasses
import sys

from . import distributed as D
from . import signals
from .checkpoint import read_checkpoint, resume_hint, resume_point
from .config import TrainConfig
from .preflight import Setup, preflight
from .rundir import RunLock, prepare
from .train import run


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg`` in ``cfg.out_dir`` and return its summary. Every setting, the output folder,
    the model specs, the task's data, the reward and the context length are checked before any
    file is written or any model loaded; then the folder is locked for the run (one trainer at a
    time), a crash's temporary files are removed, an earlier run there is refused unless resumed
    (``resume``) or deleted (``overwrite``), and a resume starts from the latest usable checkpoint
    whose settings match (``checkpoint.resume_point``)."""
    if D.launched():
        D.check_launch(cfg.prompts_per_step, cfg.algorithm.responses_per_prompt(cfg.group_size),
                       cfg.mini_batches)  # before any work: the batch divides among the ranks
    setup = preflight(cfg)
    cfg = setup.cfg  # with max_new_tokens resolved from the task when it was not set
    with signals.graceful_stop():  # SIGTERM / SIGINT: the lock released, the last line says where to resume
        signals.own_writes()  # a process forked inside the run (by a reward) never writes its files
        try:
            if not D.launched():  # one process
                with RunLock(cfg.out_dir):
                    prepare(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
                    start = resume_point(cfg) if cfg.resume else None
                    return run(cfg, setup, start)
            return train_distributed(cfg, setup)
        except signals.Stopped as stop:
            stop.where = resume_hint(cfg.out_dir)
            raise


def train_distributed(cfg: TrainConfig, setup: Setup) -> dict:
    """``train`` on every rank of a torchrun launch: join the process group; rank 0 locks and
    prepares the folder and picks the checkpoint to resume from (its decision, or its error, is
    given to every rank); every rank then runs the loop on its share of each batch."""
    dist, device = D.init(setup.device, cfg.dist_timeout)
    lock = RunLock(cfg.out_dir) if dist.main else None
    try:
        print(f"distributed: {dist.world} ranks ({'nccl' if device.type == 'cuda' else 'gloo'}), "
              f"{cfg.prompts_per_step // dist.world} prompts per rank per step", flush=True)
        held = {}

        def begin():
            lock.acquire()
            prepare(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
            held["start"] = resume_point(cfg) if cfg.resume else None
            return str(held["start"].path) if held["start"] is not None else None

        path = D.on_main(begin)
        start = held.get("start") if dist.main else (read_checkpoint(path, check=False) if path else None)
        summary = run(cfg, dataclasses.replace(setup, device=device), start)
        D.barrier()  # no rank leaves (and closes its connections) while another still works
        return summary
    finally:
        if lock is not None:
            lock.release()
        D.close()


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run the ``rlad train`` command ``argv`` again under ``torch.distributed.run`` with
    ``nproc`` processes on this machine (``--standalone``: a free local port), without ``--nproc``."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    rest, i = [], 0
    while i < len(argv):
        if argv[i] == "--nproc":
            i += 2
            continue
        if argv[i].startswith("--nproc="):
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "rlad", *rest]
    print(f"rlad train: {' '.join(cmd[1:])}", flush=True)
    return run_child(cmd, what=f"torchrun and its {nproc} ranks")


def run_child(cmd: list[str], *, what: str) -> int:
    """Run ``cmd`` (torchrun) to its end and return its exit code. It dies with this process
    (``PR_SET_PDEATHSIG``, Linux), and SIGINT / SIGTERM sent here are passed on to it (torchrun
    passes them to its ranks, which stop gracefully); a child still running ``signals.GRACE_S``
    seconds later is killed. Then this process exits with ``128 + signal``."""
    import subprocess

    proc = subprocess.Popen(cmd, preexec_fn=signals.die_with_parent)
    with signals.graceful_stop():
        try:
            return proc.wait()
        except signals.Stopped as stop:
            print(f"rlad train: {signals.name(stop.signum)}: stopping {what} (at most {signals.GRACE_S:.0f} s)",
                  file=sys.stderr, flush=True)
            signals.stop_children([proc], stop.signum)
            stop.where = (f"{what} stopped (exit {proc.returncode}); continue with the same command and --resume "
                          f"true")
            raise
