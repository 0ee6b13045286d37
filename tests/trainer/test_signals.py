"""Stop means stop (rlad/signals.py): every case is a real process told to stop by a real signal.

* ``kill -9`` of ``rlad study``: its ``rlad train`` dies with it (PR_SET_PDEATHSIG), stopping
  gracefully: no orphan keeps the run's lock.
* SIGINT to ``rlad study``: passed on to its running run at once (not after the run's end); the
  study exits 130 naming the stopped runs.
* SIGTERM to ``rlad train --nproc 2``: torchrun and both gloo ranks stop, the lock is released,
  the command exits 143.
* SIGTERM during a checkpoint write: the write finishes, the lock is released, the last line says
  where to resume from, exit 143; a second SIGTERM abandons the write, leaving no temporary folder.
* A reward that forks (``--reward-timeout 0``): the forked copies never write; the metrics log has
  exactly the run's records.
* A run folder locked by a live process: ``rlad train`` and ``rlad study`` name its PID.

Processes are found through /proc (Linux); a zombie (a dead process nobody reaped yet) counts as
gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rlad
from rlad.cli import main

LOCK = "rlad.lock"

REPO = str(Path(rlad.__file__).resolve().parents[1])
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG: Linux")

TRAIN = ["--algo", "grpo", "--student", "preset:micro", "--task", "echo", "--levels", "1", "--prompts-per-step",
         "2", "--group-size", "2", "--max-new-tokens", "4", "--micro-batch-size", "8", "--mini-batches", "1",
         "--eval-prompts", "2", "--eval-every", "0", "--threads", "1", "--quiet", "true"]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLAD_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               **extra)
    return env


def _start(args, log, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _alive(pid: int) -> bool:
    """A running process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pids_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (this test's unique folder)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and _alive(int(entry)):
                out.append(int(entry))
    return out


def _wait(condition, timeout: float, what: str, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    extra = ""
    if log is not None:
        log.seek(0)
        extra = log.read()[-3000:]
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{extra}")


def lock_holder(out: Path) -> dict | None:
    """The record in ``out``'s lock file while a live process holds it (flock), else None."""
    import fcntl

    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return json.loads(os.pread(fd, 4096, 0) or b"{}") or {"pid": "?"}
    finally:
        os.close(fd)
    return None


def _training(out: Path):
    """The PID holding ``out``'s lock once its run has logged a step (None before)."""
    holder = lock_holder(out)
    metrics = out / "metrics.jsonl"
    if holder and metrics.is_file() and any('"eval"' not in line for line in metrics.read_text().splitlines()):
        return int(holder["pid"])
    return None


def _kill_all(text: str) -> None:
    for pid in _pids_with(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _study(tmp_path, steps: int = 100_000) -> tuple[Path, Path]:
    import yaml

    base = {"student": "preset:micro", "task": "echo", "levels": [1], "steps": steps, "prompts_per_step": 2,
            "group_size": 2, "max_new_tokens": 4, "micro_batch_size": 8, "mini_batches": 1, "eval_prompts": 2,
            "eval_every": 0, "save_every": 1, "algo": "grpo"}
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "study"), "seeds": [0], "base": base,
                                    "arms": {"grpo": {}}}))
    return spec, tmp_path / "study" / "grpo" / "seed_0"


@contextlib.contextmanager
def _running_study(tmp_path):
    """``rlad study`` of one long run, once that run trains: (the study's process, its log, the
    run's folder, the run's PID); whatever is left of them is killed afterwards."""
    spec, run = _study(tmp_path)
    with open(tmp_path / "study.log", "w+") as log:
        proc = _start(["-m", "rlad", "study", str(spec), "--quiet"], log)
        try:
            yield proc, log, run, _wait(lambda: _training(run), 120, "the study's run to train", log)
        finally:
            proc.kill()
            _kill_all(str(tmp_path))


def test_kill_9_of_a_study_takes_its_run_with_it(tmp_path):
    with _running_study(tmp_path) as (proc, log, run, child):
        proc.kill()
        proc.wait(30)
        _wait(lambda: not _alive(child), 60, f"the orphaned run (PID {child}) to end")
        assert lock_holder(run) is None and not (run / LOCK).exists()  # a graceful stop released it
        tail = (run / "train.log").read_text().strip().splitlines()[-1]
        assert "stopped by SIGTERM" in tail and "--resume true" in tail, tail


def test_sigint_to_a_study_stops_its_runs_at_once(tmp_path):
    with _running_study(tmp_path) as (proc, log, run, child):
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert time.monotonic() - t0 < 30  # not the 100,000 steps of the run
        assert not _alive(child) and lock_holder(run) is None
        log.seek(0)
        last = log.read().strip().splitlines()[-1]
        assert "rlad study: stopped by SIGINT; runs stopped: grpo/seed_0" in last, last
        assert "stopped by SIGINT" in (run / "train.log").read_text()


def test_sigterm_to_train_nproc_stops_torchrun_and_its_ranks(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "rlad", "train", "--nproc", "2", "--out-dir", str(out), "--steps", "100000", "--save-every", "0",
            *TRAIN]
    with open(tmp_path / "train.log", "w+") as log:
        proc = _start(args, log)
        try:
            _wait(lambda: _training(out), 180, "the ranks to train", log)
            workers = _pids_with(str(out))
            assert len(workers) >= 4, workers  # rlad train, torchrun, 2 ranks
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 143
            _wait(lambda: not _pids_with(str(out)), 60, "torchrun and the ranks to end", log)
            assert lock_holder(out) is None and not (out / LOCK).exists()
            log.seek(0)
            text = log.read()
            assert "rlad train: stopped by SIGTERM; torchrun and its 2 ranks stopped" in text.strip().splitlines()[-1]
        finally:
            proc.kill()
            _kill_all(str(tmp_path))


# the driver sends SIGTERM to its own trainer while a checkpoint is being written (from inside the
# torch.save of the trainer state): once (the write finishes, then the run stops), or twice (the
# second abandons the write)
SIGTERM_DRIVER = """\
import os
import signal
import sys

import torch

from rlad.cli import main

at_step, times = int(sys.argv[1]), int(sys.argv[2])
real_save = torch.save


def save(obj, f, *args, **kw):
    if isinstance(obj, dict) and obj.get("state", {}).get("step") == at_step:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
    return real_save(obj, f, *args, **kw)


torch.save = save
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("times", [1, 2], ids=["finish-the-write", "abandon-it"])
def test_sigterm_during_a_checkpoint_write(tmp_path, times):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGTERM_DRIVER)
    out = tmp_path / "run"
    args = ["train", "--out-dir", str(out), "--steps", "4", "--save-every", "1", *TRAIN]
    proc = subprocess.run([sys.executable, str(driver), "2", str(times), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, (proc.stdout[-2000:], proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    ckpts = out / "checkpoints"
    written = sorted(p.name for p in ckpts.iterdir())
    kept = "step_000002" if times == 1 else "step_000001"
    assert written == (["step_000001", "step_000002"] if times == 1 else ["step_000001"])  # no temporary folder
    assert last == (f"rlad train: stopped by SIGTERM; the last checkpoint is {ckpts / kept}: continue with --resume "
                    f"true (same settings, out_dir {out})"), last
    assert not (out / LOCK).exists()
    if times == 1:
        assert "finishing the checkpoint being written, then stopping" in proc.stderr
        assert (ckpts / kept / "COMPLETE").is_file()
    assert main([*args, "--resume", "true"]) == 0  # and it continues from there
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_reward_that_forks_never_writes(tmp_path):
    (tmp_path / "forking_reward.py").write_text(
        "import os\n\n\ndef reward(response, answer):\n    os.fork()  # both copies return from here\n"
        "    return 1.0 if answer in response else 0.0\n")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    env = _env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-m", "rlad", "train", "--out-dir", str(out), "--steps", "2",
                           "--task", f"jsonl:{data}", "--reward", "forking_reward:reward", "--reward-timeout", "0",
                           "--max-new-tokens", "4", "--algo", "grpo", "--student", "preset:micro",
                           "--prompts-per-step", "2", "--group-size", "2", "--eval-prompts", "2", "--eval-every", "0",
                           "--threads", "1", "--quiet", "true"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    time.sleep(1.0)  # any forked copy still on its way to a write
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], bool(r.get("eval"))) for r in records] == [(0, True), (1, False), (2, False), (2, True)]
    _kill_all(str(out))


def test_a_run_folder_locked_by_a_live_process_names_it(tmp_path, capsys):
    """An orphan from an earlier rlad (or any live holder) is named with its PID, by rlad train
    and by rlad study before it starts anything."""
    from rlad.rundir import claim

    spec, out = _study(tmp_path, steps=1)
    claim(out.parents[1], "study")
    claim(out, "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlad.rundir import RunLock\n"
                               f"RunLock({str(out)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n"],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["train", "--out-dir", str(out), "--steps", "1", *TRAIN]) == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and f"still running: stop it with `kill {holder.pid}`" in err, err
        assert main(["study", str(spec), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"runs in use by another process: grpo/seed_0 (PID {holder.pid}" in err, err
        assert not (out / "train.log").exists()  # refused before any run started
    finally:
        holder.kill()
        holder.wait()
