"""The run directory: an earlier run is never destroyed or mixed with a new one, one trainer at a
time (the lock), settings that change a run are refused on resume, a crash's temporary files are
cleaned up, disk errors name the path, and the final evaluation is recorded once."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlad
from rlad.cli import main
from rlad.launch import train
from rlad.report import WALL_CLOCK

REPO = str(Path(rlad.__file__).resolve().parents[1])
TIMING = WALL_CLOCK


def _records(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _files(out_dir):
    """Every file under ``out_dir`` (relative name -> bytes)."""
    out = Path(out_dir)
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _cli_args(cfg):
    """The command line of a TrainConfig (its non-default settings)."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cfg)}
    args = ["train"]
    for name, value in cfg.to_dict().items():
        if value == defaults[name]:
            continue
        values = value if isinstance(value, list) else [value]
        args += ["--" + name.replace("_", "-"), *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return args


# ----------------------------------------------------------------------------- 0. what rlad did not write
def _one_line_error(capsys, command="train"):
    err = capsys.readouterr().err
    assert err.startswith(f"rlad {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert len(err) < 600, err  # one readable line, not a dump of every file
    return err


def _model_folder(path, tok):
    """A user's transformers model folder (weights, config.json, tokenizer)."""
    from rlad.models import load_model

    load_model("preset:micro", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("student", ["the model", "preset:micro"])
@pytest.mark.parametrize("flag", [{}, {"overwrite": True}, {"resume": True}])
def test_a_model_folder_is_never_taken_as_out_dir(tiny_config, tok, tmp_path, capsys, student, flag):
    """--out-dir M with M a model folder (--student M too, or not): refused before any work, one
    line naming the folder, every file of M as it was, whatever --overwrite or --resume say."""
    model = _model_folder(tmp_path / "M", tok)
    before = _files(model)
    cfg = tiny_config(out_dir=str(model), student=str(model) if student == "the model" else student, **flag)
    capsys.readouterr()
    assert main(_cli_args(cfg)) == 2
    err = _one_line_error(capsys)
    if student == "the model":
        assert f"config: out_dir={str(model)!r}: is the student {model}; rlad never writes where its inputs" in err
    else:
        assert (f"config: out_dir={str(model)!r}: {model} is not empty and is not a folder rlad made (it has no "
                f"rlad-run.json)") in err
    assert _files(model) == before


@pytest.mark.parametrize("flag", [{}, {"overwrite": True}, {"resume": True}])
def test_a_folder_with_a_lone_config_json_is_not_a_failed_start(tiny_config, capsys, flag):
    """A user's folder holding only a config.json is not rlad's: refused, the file kept."""
    cfg = tiny_config(**flag)
    out = Path(cfg.out_dir)
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama"}')
    capsys.readouterr()
    assert main(_cli_args(cfg)) == 2
    assert "is not a folder rlad made" in _one_line_error(capsys)
    assert _files(out) == {"config.json": b'{"model_type": "llama"}'}


def test_files_that_merely_have_rlads_names_are_never_deleted(tiny_config, capsys):
    """--overwrite true in a folder rlad did not make, holding files named like a run's."""
    cfg = tiny_config(overwrite=True)
    out = Path(cfg.out_dir)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch=3.ckpt").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"loss": 1}\n')
    before = _files(out)
    capsys.readouterr()
    assert main(_cli_args(cfg)) == 2
    assert "is not a folder rlad made" in _one_line_error(capsys)
    assert _files(out) == before


def test_an_empty_out_dir_setting_is_refused(tiny_config, tmp_path, monkeypatch, capsys):
    """--out-dir "" would be the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("mine")
    capsys.readouterr()
    assert main([*_cli_args(tiny_config()), "--out-dir", ""]) == 2
    assert ("config: out_dir='': empty; name the output folder (an empty name would be the current directory)"
            in _one_line_error(capsys))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_out_dir_never_holds_an_input(tiny_config, tmp_path, capsys):
    """An overwrite (or a checkpoint prune) would delete an input inside out_dir: a model from one
    of its checkpoints, the task file, the config file. Refused, nothing touched."""
    import yaml

    cfg = tiny_config()
    train(cfg)
    out = Path(cfg.out_dir)
    model = out / "checkpoints" / "step_000002" / "model"
    data = out / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Echo 3.", "answer": "3"}) + "\n")
    config = out / "mine.yaml"
    config.write_text(yaml.safe_dump({"lr": 1e-3}))
    before = _files(out)
    cases = [({"student": str(model)}, f"holds the student {model}"),
             ({"algo": "rlad", "teacher": str(model)}, f"holds the teacher {model}"),
             ({"task": f"jsonl:{data}", "levels": []}, f"holds the task file {data}")]
    for kw, expected in cases:
        capsys.readouterr()
        assert main(_cli_args(tiny_config(overwrite=True, **kw))) == 2, kw
        assert f"config: out_dir={str(out)!r}: {expected}; rlad never writes where its inputs are" in \
            _one_line_error(capsys)
    assert main([*_cli_args(tiny_config(overwrite=True)), "--config", str(config)]) == 2
    assert f"holds the config file {config}" in _one_line_error(capsys)
    assert _files(out) == before


def test_the_demo_and_a_study_refuse_a_folder_rlad_did_not_make(tmp_path, capsys):
    import yaml

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "teacher").mkdir()
    (mine / "teacher" / "config.json").write_text("{}")
    before = _files(mine)
    assert main(["demo", "--out-dir", str(mine), "--quiet"]) == 2
    assert "--out-dir " + f"{mine} is not empty and is not a folder rlad made" in _one_line_error(capsys, "demo")
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({"out_dir": str(mine), "seeds": [0], "arms": {"grpo": {"algo": "grpo"}},
                                    "base": {"student": "preset:micro", "task": "echo", "levels": [1], "steps": 1,
                                             "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4}}))
    assert main(["study", str(spec), "--quiet"]) == 2
    assert f"study out_dir {mine} is not empty and is not a folder rlad made" in _one_line_error(capsys, "study")
    assert _files(mine) == before
    # a study's run folder that is someone else's: refused before any run starts
    from rlad.rundir import claim

    spec.write_text(spec.read_text().replace(str(mine), str(tmp_path / "study")))
    claim(tmp_path / "study", "study")
    (tmp_path / "study" / "grpo" / "seed_0").mkdir(parents=True)
    (tmp_path / "study" / "grpo" / "seed_0" / "notes.txt").write_text("mine")
    assert main(["study", str(spec), "--quiet"]) == 2
    assert "study run folder " in _one_line_error(capsys, "study")
    assert sorted(p.name for p in (tmp_path / "study" / "grpo" / "seed_0").iterdir()) == ["notes.txt"]


def test_a_run_from_before_the_marker_resumes(tiny_config, capsys):
    """A run folder written before rlad marked its folders (its config.json names this folder as
    out_dir; nothing foreign in it) is still rlad's: it resumes and gets its marker. One more file
    of someone else's in it, and it is refused."""
    cfg = tiny_config(steps=2)
    train(cfg)
    out = Path(cfg.out_dir)
    (out / "rlad-run.json").unlink()
    capsys.readouterr()
    train(tiny_config(steps=3, resume=True))
    assert "a run written before rlad marked its folders; marked it as rlad's (rlad-run.json)" in \
        capsys.readouterr().out
    assert (out / "rlad-run.json").is_file()
    assert [r["step"] for r in _records(out) if not r.get("eval")] == [1, 2, 3]
    (out / "rlad-run.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a folder rlad made"):
        train(tiny_config(steps=4, resume=True))


def test_export_never_writes_into_a_folder_it_did_not_make(tiny_config, tmp_path, capsys):
    """rlad export refuses the run folder (it holds the checkpoint), the checkpoint itself, a
    folder inside it and a user's non-empty folder, with one line each (no shutil.Error dump);
    --overwrite replaces only an earlier export, through a temporary folder beside it."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    train(cfg)
    out = Path(cfg.out_dir)
    ck = out / "checkpoints" / "step_000002"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    run_before, mine_before = _files(out), _files(mine)
    refused = [(out, ["--overwrite"], f"--out={str(out)!r}: holds the checkpoint {ck}; rlad never writes where"),
               (ck, [], f"--out={str(ck)!r}: is the checkpoint {ck}; rlad never writes where"),
               (ck / "model", ["--overwrite"], f"--out={str(ck / 'model')!r}: is inside the checkpoint {ck}"),
               (mine, [], f"--out={str(mine)!r}: is not empty; choose a new or empty folder, or add --overwrite"),
               (mine, ["--overwrite"], f"--out={str(mine)!r}: is not an earlier rlad export (it has no "
                                       f"rlad-export.json), so --overwrite may not replace it")]
    for target, flags, expected in refused:
        capsys.readouterr()
        assert main(["export", str(ck), "--out", str(target), *flags]) == 2, target
        assert expected in _one_line_error(capsys, "export")
    assert _files(out) == run_before and _files(mine) == mine_before

    exported = tmp_path / "exported"
    assert main(["export", str(ck), "--out", str(exported)]) == 0
    assert _files(exported) == {**{f: b for f, b in _files(ck / "model").items()},
                                "rlad-export.json": (exported / "rlad-export.json").read_bytes()}
    assert json.loads((exported / "rlad-export.json").read_text())["step"] == 2
    capsys.readouterr()
    assert main(["export", str(ck), "--out", str(exported)]) == 2  # an earlier export: only with --overwrite
    assert "is not empty" in _one_line_error(capsys, "export")
    older = out / "checkpoints" / "step_000001"
    assert main(["export", str(older), "--out", str(exported), "--overwrite"]) == 0
    assert json.loads((exported / "rlad-export.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine", "run"]  # no temporary left beside
    AutoModelForCausalLM.from_pretrained(exported)


def test_a_failed_export_leaves_the_earlier_one_whole(tiny_config, tmp_path, monkeypatch, capsys):
    """The disk fills up during an export that replaces an earlier one: the earlier export is as
    it was and no temporary folder is left."""
    import shutil

    cfg = tiny_config()
    train(cfg)
    ck = Path(cfg.out_dir) / "checkpoints" / "step_000002"
    exported = tmp_path / "exported"
    assert main(["export", str(ck.with_name("step_000001")), "--out", str(exported)]) == 0
    before = _files(exported)
    real = shutil.copytree

    def full(src, dst, *a, **k):
        real(src, dst, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", full)
    capsys.readouterr()
    assert main(["export", str(ck), "--out", str(exported), "--overwrite"]) == 2
    assert f"No space left on device: cannot write {exported}" in _one_line_error(capsys, "export")
    assert _files(exported) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]


# ----------------------------------------------------------------------------- 1. an earlier run
def test_a_new_run_in_a_used_out_dir_is_refused_and_the_old_run_kept(tiny_config):
    cfg = tiny_config()
    train(cfg)
    before = _files(cfg.out_dir)
    with pytest.raises(ValueError, match=r"out_dir .*run holds an earlier run \(config.json, metrics.jsonl, .*"
                                         r"checkpoints\); continue it with --resume true, delete it and start over "
                                         r"with --overwrite true, or choose another --out-dir"):
        train(tiny_config(steps=4, seed=1))
    assert _files(cfg.out_dir) == before  # nothing deleted, rewritten or pruned


def test_overwrite_deletes_the_earlier_run_and_nothing_else(tiny_config, capsys):
    from rlad.rundir import read_marker

    cfg = tiny_config(steps=3, save_every=1, keep_checkpoints=5)
    train(cfg)
    first_id = read_marker(cfg.out_dir)["run_id"]
    notes = Path(cfg.out_dir) / "notes.txt"
    notes.write_text("mine")
    mine = Path(cfg.out_dir) / "checkpoints" / "epoch=3.ckpt"  # the user's, in rlad's folder
    mine.write_bytes(b"weights")
    summary = train(tiny_config(steps=2, seed=1, overwrite=True))
    assert "overwrite: deleted the earlier run's config.json, metrics.jsonl" in capsys.readouterr().out
    assert notes.read_text() == "mine" and mine.read_bytes() == b"weights"
    ckpts = sorted(p.name for p in (Path(cfg.out_dir) / "checkpoints").iterdir())
    assert ckpts == ["epoch=3.ckpt", "step_000001", "step_000002"]  # the new run's, none of the old run's step 3
    assert read_marker(cfg.out_dir)["run_id"] != first_id  # a new run
    assert summary["checkpoint"].endswith("step_000002")
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["seed"] == 1
    assert [r["step"] for r in _records(cfg.out_dir)] == [0, 1, 2, 2]  # eval 0, steps 1-2, final eval


def test_a_start_that_recorded_nothing_is_not_an_earlier_run(tiny_config):
    """A failed start leaves its marker and config.json (no metrics, no checkpoint): the next
    start replaces it."""
    from rlad.rundir import claim

    cfg = tiny_config()
    claim(cfg.out_dir)
    (Path(cfg.out_dir) / "config.json").write_text("{}")
    (Path(cfg.out_dir) / "checkpoints").mkdir()
    train(cfg)
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["steps"] == 2


def test_resume_and_overwrite_exclude_each_other(tiny_config):
    with pytest.raises(ValueError, match=r"config: overwrite=True: resume=true continues the run in out_dir and "
                                         r"overwrite=true deletes it: choose one"):
        tiny_config(resume=True, overwrite=True)
    with pytest.raises(ValueError, match=r"config: force_resume=True: only applies with resume=true"):
        tiny_config(force_resume=True)


def test_resume_with_settings_that_change_the_run_is_refused_unless_forced(tiny_config, capsys):
    cfg = tiny_config(steps=2)
    train(cfg)
    before = _files(cfg.out_dir)
    with pytest.raises(ValueError, match=r"resume: settings differ from those .*step_000002 was written with, in "
                                         r"ways that change the run: seed: 0 -> 1; lr: 0.0001 -> 0.001; resume with "
                                         r"the same settings, or add --force-resume true"):
        train(tiny_config(steps=2, seed=1, lr=1e-3, resume=True))
    assert _files(cfg.out_dir) == before
    capsys.readouterr()
    train(tiny_config(steps=3, seed=1, resume=True, force_resume=True))
    out = capsys.readouterr().out
    assert "warning: resume: continuing with changed settings (force_resume): seed: 0 -> 1" in out
    assert "resumed from" in out and "at step 2" in out
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["seed"] == 1  # config.json: the new settings


def test_settings_safe_to_change_on_resume(tiny_config, capsys):
    """How the run runs (quiet, threads, micro-batch size, checkpoint and eval cadence, the reward
    timeout) may change, and steps may grow under a constant schedule: the run continues."""
    train(tiny_config(steps=2))
    capsys.readouterr()
    train(tiny_config(steps=3, resume=True, quiet=False, micro_batch_size=2, save_every=3, keep_checkpoints=3,
                      eval_every=1, reward_timeout=5.0))
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out and "settings differ" not in out
    assert [r["step"] for r in _records(tiny_config().out_dir) if not r.get("eval")] == [1, 2, 3]


def test_steps_may_not_change_when_the_schedule_depends_on_them(tiny_config):
    train(tiny_config(steps=2, schedule="linear"))
    with pytest.raises(ValueError, match=r"settings differ .*: steps: 2 -> 3; resume"):
        train(tiny_config(steps=3, schedule="linear", resume=True))


def test_steps_may_not_end_before_the_checkpoint(tiny_config):
    train(tiny_config(steps=3))
    with pytest.raises(ValueError, match=r"resume: config: steps=2 ends before the checkpoint .*step_000003 \(step "
                                         r"3\); set steps >= 3"):
        train(tiny_config(steps=2, resume=True))


def test_resume_without_a_checkpoint_checks_the_settings_too(tiny_config):
    """A run that died before its first checkpoint left config.json and metrics: --resume restarts
    it from step 0 when its settings are the same, and refuses different ones."""
    from rlad.rundir import claim

    cfg = tiny_config(save_every=0)
    out = Path(cfg.out_dir)
    claim(out)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "metrics.jsonl").write_text('{"step": 0, "eval": true}\n')
    with pytest.raises(ValueError, match=r"settings differ from those .*config.json was written with.*seed: 0 -> 5"):
        train(tiny_config(save_every=0, seed=5, resume=True))
    train(tiny_config(save_every=0, resume=True))
    assert [r["step"] for r in _records(out)] == [0, 1, 2, 2]


# ----------------------------------------------------------------------------- 2. the lock
HOLD_LOCK = """\
import sys
from rlad.rundir import RunLock

with RunLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_concurrent_start_in_the_same_out_dir_is_refused(tiny_config, capsys):
    """A second trainer (a requeued job) while another holds the folder: exit 2, one line naming
    the holder's PID and host; nothing of the running one is touched. Once it ends, a start works."""
    cfg = tiny_config()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, cfg.out_dir], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(_cli_args(cfg)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rlad train: error: out_dir {cfg.out_dir} is in use by another rlad run (PID "
                              f"{holder.pid} on host {socket.gethostname()}, started ")
        assert err.count("\n") == 1 and "Traceback" not in err
        assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == ["rlad.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (Path(cfg.out_dir) / "rlad.lock").exists()  # its holder removed it on the way out
    assert main(_cli_args(cfg)) == 0
    assert not (Path(cfg.out_dir) / "rlad.lock").exists()


def test_a_stale_lock_is_taken_over(tiny_config, capsys):
    """The lock file of a run that died (SIGKILL leaves it; the kernel dropped its flock): taken
    over, saying whose it was."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cfg = tiny_config()
    Path(cfg.out_dir).mkdir()
    (Path(cfg.out_dir) / "rlad.lock").write_text(json.dumps({"pid": dead.pid, "host": "node7",
                                                             "started": "2025-01-01 00:00:00"}))
    train(cfg)
    assert (f"took over the stale lock of PID {dead.pid} on host node7, started 2025-01-01 00:00:00: that run is "
            f"no longer running") in capsys.readouterr().out
    assert not (Path(cfg.out_dir) / "rlad.lock").exists()


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch):
    """On a filesystem without flock (ENOLCK), a live holder on this host is refused and a dead
    one is taken over."""
    import fcntl

    from rlad.rundir import RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / "rlad.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(ValueError, match=rf"may be in use by another rlad run \(PID {os.getppid()} on host .*its "
                                         rf"filesystem has no file locks.*if that run has ended, delete .*rlad.lock"):
        RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with RunLock(tmp_path) as held:
        assert held.taken_over["pid"] == dead.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ----------------------------------------------------------------------------- 4. disk errors, temporary files
def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous(tiny_config, monkeypatch, capsys):
    """torch.save failing as it does on a full disk (a cryptic inline_container.cc error): one
    line naming the checkpoint, the cause and the intact previous checkpoint; no temporary left."""
    import shutil

    cfg = tiny_config(steps=3)
    real_save, real_usage = torch.save, shutil.disk_usage
    calls = []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1728 vs 1622")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    capsys.readouterr()
    assert main(_cli_args(cfg)) == 2
    err = capsys.readouterr().err
    root = Path(cfg.out_dir) / "checkpoints"
    assert err == (f"rlad train: error: cannot write checkpoint {root / 'step_000002'}: the disk is full (0 bytes "
                   f"free) (RuntimeError: [enforce fail at inline_container.cc:603] . unexpected pos 1728 vs 1622); "
                   f"the previous checkpoint {root / 'step_000001'} is intact; free space or fix the folder, then "
                   f"continue with --resume true\n")
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]
    assert not (Path(cfg.out_dir) / "rlad.lock").exists()


def test_a_read_only_checkpoint_folder_is_reported_as_such(tmp_path, tok, monkeypatch):
    from rlad.checkpoint import latest_checkpoint, save_checkpoint
    from rlad.models import load_model

    m = load_model("preset:micro", tok)
    save_checkpoint(tmp_path, 1, m, tok, {"state": {"step": 1}})

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(type(m), "save_pretrained", read_only)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*step_000002: read-only file system \(OSError: "
                                      r"\[Errno 30\] Read-only file system\); the previous checkpoint .*step_000001 "
                                      r"is intact"):
        save_checkpoint(tmp_path, 2, m, tok, {"state": {"step": 2}})
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_a_read_only_out_dir_is_refused_before_any_work(tiny_config, monkeypatch):
    cfg = tiny_config()
    real = os.statvfs

    def read_only(path):
        st = real(path)
        return os.statvfs_result((*st[:8], st.f_flag | os.ST_RDONLY, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", read_only)
    with pytest.raises(ValueError, match=r"config: out_dir='.*run': cannot write in .* \(read-only or permission "
                                         r"denied\); choose another out_dir"):
        train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_temporary_files_of_a_crash_are_removed_at_start(tiny_config, capsys):
    """A dead process's half-written checkpoint (named with a PID that is alive now, as after PID
    reuse or on another host), a half-written config and the old rewind's metrics.tmp: all gone
    once the folder is locked, before they can keep a disk full."""
    cfg = tiny_config()
    train(cfg)
    out = Path(cfg.out_dir)
    tmp_ckpt = out / "checkpoints" / ".step_000003.tmp-1"  # PID 1 is alive
    tmp_ckpt.mkdir()
    (tmp_ckpt / "trainer.pt").write_bytes(b"x" * 100)
    (out / ".config.json.tmp-1").write_text("{")
    (out / "metrics.tmp").write_text("")
    capsys.readouterr()
    train(tiny_config(resume=True))
    assert "removed 3 temporary file(s) of an interrupted run" in capsys.readouterr().out
    assert not tmp_ckpt.exists() and not (out / ".config.json.tmp-1").exists() and not (out / "metrics.tmp").exists()


def test_rewind_truncates_in_place_and_needs_no_free_space(tmp_path, monkeypatch):
    """Resuming on a full disk: the metrics past the checkpoint are cut off in place (no copy,
    no metrics.tmp); a line cut by the crash goes too."""
    from rlad.report import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(4):
        log.write({"step": step, "x": step})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "x"')  # cut by a crash
    inode = os.stat(log.path).st_ino

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    monkeypatch.setattr(Path, "write_bytes", no_space)
    log.rewind(2)
    monkeypatch.undo()
    assert [r["step"] for r in log.records()] == [0, 1, 2]
    assert log.path.read_text().endswith("}\n")
    assert os.stat(log.path).st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_failed_metrics_write_names_the_file(tmp_path, monkeypatch):
    from rlad.report import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", no_space)
    with pytest.raises(OSError, match=r"No space left on device: cannot append a record to .*metrics.jsonl"):
        log.write({"step": 1})


# ----------------------------------------------------------------------------- 5. the final evaluation, once
def test_resuming_a_finished_run_records_nothing_twice(tiny_config, capsys):
    cfg = tiny_config()
    first = train(cfg)
    records = _records(cfg.out_dir)
    capsys.readouterr()
    again = train(tiny_config(resume=True))
    assert "final evaluation (step 2) already in" in capsys.readouterr().out
    assert _records(cfg.out_dir) == records
    assert [r["step"] for r in records if r.get("eval")] == [0, 2]
    assert again == first


def test_a_run_killed_between_its_final_evaluation_and_its_summary(tiny_config, monkeypatch):
    cfg = tiny_config()
    straight = train(tiny_config(out_dir=cfg.out_dir + "-straight"))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlad.report.plot", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert not (Path(cfg.out_dir) / "summary.json").exists()
    assert not (Path(cfg.out_dir) / "rlad.lock").exists()  # released on the way out
    monkeypatch.undo()
    summary = train(tiny_config(resume=True))
    assert [r["step"] for r in _records(cfg.out_dir) if r.get("eval")] == [0, 2]
    assert _records(cfg.out_dir) == _records(cfg.out_dir + "-straight")
    assert summary["final"] == straight["final"]
    assert list(summary["final"]) == list(straight["final"])  # the same order in the summary table
