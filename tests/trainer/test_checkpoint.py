"""Atomic checkpoints: a complete one round-trips and loads with plain transformers; a
half-written one is never picked up; a damaged one is detected by its manifest and the previous
one is used instead."""

import hashlib
import json
import random
import re
import shutil

import pytest
import torch

from rlad.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from rlad.models import load_model


def _model(tok, seed):
    return load_model("preset:micro", tok, seed=seed)


def test_round_trip_and_plain_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    m = _model(tok, 1)
    rng = random.Random(5)
    rng.random()
    torch.manual_seed(3)
    state = {"rng": rng_state(rng), "state": {"step": 4}, "optimizer": {"x": torch.arange(3)}}
    path = save_checkpoint(tmp_path, 4, m, tok, state)
    assert path.name == "step_000004" and latest_checkpoint(tmp_path) == path
    expect_py, expect_torch = rng.random(), torch.rand(2)

    other = _model(tok, 2)
    assert not torch.equal(other.model.embed_tokens.weight, m.model.embed_tokens.weight)
    loaded = load_checkpoint(path, other)
    for a, b in zip(m.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rng2 = random.Random(0)
    set_rng_state(loaded["rng"], rng2)
    assert rng2.random() == expect_py and torch.equal(torch.rand(2), expect_torch)
    assert loaded["state"]["step"] == 4

    plain = AutoModelForCausalLM.from_pretrained(path / "model")
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(plain(ids).logits, m(ids).logits)


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, tok, monkeypatch):
    m = _model(tok, 1)
    good = save_checkpoint(tmp_path, 2, m, tok, {"state": {"step": 2}})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 3, m, tok, {"state": {"step": 3}})
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step_000003").exists()
    assert latest_checkpoint(tmp_path) == good


def test_incomplete_folders_are_ignored(tmp_path, tok):
    m = _model(tok, 1)
    good = save_checkpoint(tmp_path, 1, m, tok, {"state": {"step": 1}})
    root = tmp_path / "checkpoints"
    (root / "step_000009").mkdir()                       # no COMPLETE marker
    (root / "step_000009" / "trainer.pt").write_bytes(b"garbage")
    (root / ".step_000010.tmp-999999").mkdir()            # an interrupted save
    assert latest_checkpoint(tmp_path) == good


def test_keep_prunes_old_checkpoints(tmp_path, tok):
    m = _model(tok, 1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, m, tok, {"state": {"step": step}}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000004"]


# ---------------------------------------------------------------- verified before trusted, fallback
def _two_checkpoints(tmp_path, tok):
    m1, m2 = _model(tok, 1), _model(tok, 2)
    save_checkpoint(tmp_path, 1, m1, tok, {"state": {"step": 1}, "config": {"seed": 0}}, keep=5)
    save_checkpoint(tmp_path, 2, m2, tok, {"state": {"step": 2}, "config": {"seed": 0}}, keep=5)
    return m1, tmp_path / "checkpoints"


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    pytest.param(lambda c: _truncate(c / "model" / "model.safetensors"),
                 r"model/model.safetensors has \d+ bytes, \d+ were written \(truncated or overwritten\)",
                 id="truncated-safetensors"),
    pytest.param(lambda c: _truncate(c / "trainer.pt"),
                 r"trainer.pt has \d+ bytes, \d+ were written \(truncated or overwritten\)", id="truncated-trainer.pt"),
    pytest.param(lambda c: _flip_a_byte(c / "trainer.pt"),
                 r"trainer.pt is corrupted: its SHA-256 differs from the one recorded when it was written",
                 id="altered-trainer.pt"),
    pytest.param(lambda c: shutil.rmtree(c / "model"), r"model/config.json is missing", id="missing-model"),
    pytest.param(lambda c: (c / "COMPLETE").write_text(""), r"its COMPLETE marker is empty or not valid JSON",
                 id="empty-COMPLETE"),
    pytest.param(lambda c: (c / "COMPLETE").unlink(), r"no COMPLETE marker: an interrupted or damaged checkpoint",
                 id="no-COMPLETE"),
]


@pytest.mark.parametrize("damage,problem", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, tok, capsys, damage, problem):
    from rlad.checkpoint import load_latest

    m1, root = _two_checkpoints(tmp_path, tok)
    damage(root / "step_000002")
    ck = load_latest(tmp_path)
    assert ck.path == root / "step_000001" and ck.step == 1 and ck.trainer["state"]["step"] == 1
    other = _model(tok, 3)
    ck.load_weights(other)
    for a, b in zip(m1.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    out = capsys.readouterr().out
    assert re.search(rf"warning: checkpoint unusable: {re.escape(str(root / 'step_000002'))}: {problem}; trying the "
                     rf"previous one", out), out
    assert f"moved the unusable checkpoint step_000002 to {root / 'unusable' / 'step_000002'}" in out
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "unusable"]  # kept for inspection


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, tok):
    from rlad.checkpoint import CheckpointError, load_latest

    _, root = _two_checkpoints(tmp_path, tok)
    _truncate(root / "step_000002" / "trainer.pt")
    (root / "step_000001" / "COMPLETE").write_text("")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoints \(.*step_000002: trainer.pt "
                                              r"has \d+ bytes.*; .*step_000001: its COMPLETE marker is empty.*\); the "
                                              r"run cannot be continued: start it over with --overwrite true"):
        load_latest(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]  # nothing moved


def test_a_checkpoint_without_a_manifest_still_loads(tmp_path, tok):
    """Checkpoints written before manifests (COMPLETE = {"step": N}) load, and one that cannot be
    read falls back like any other."""
    from rlad.checkpoint import load_latest

    m1, root = _two_checkpoints(tmp_path, tok)
    for step in (1, 2):
        (root / f"step_00000{step}" / "COMPLETE").write_text(json.dumps({"step": step}))
    assert load_latest(tmp_path).step == 2
    _truncate(root / "step_000002" / "model" / "model.safetensors")
    ck = load_latest(tmp_path)
    assert ck.step == 1
    other = _model(tok, 3)
    ck.load_weights(other)
    assert torch.equal(other.model.embed_tokens.weight, m1.model.embed_tokens.weight)


def test_the_manifest_records_every_file(tmp_path, tok):
    path = save_checkpoint(tmp_path, 3, _model(tok, 1), tok, {"state": {"step": 3}, "config": {"seed": 4}})
    info = json.loads((path / "COMPLETE").read_text())
    assert info["step"] == 3 and info["config"] == {"seed": 4}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(info["files"]) == on_disk and {"trainer.pt", "model/model.safetensors"} <= on_disk
    for rel, meta in info["files"].items():
        assert meta["size"] == (path / rel).stat().st_size
        assert meta["sha256"] == hashlib.sha256((path / rel).read_bytes()).hexdigest()


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path, tok):
    """A newer step folder left in place (from an abandoned trajectory) does not count towards
    ``keep``: the checkpoint just written survives with keep=1."""
    m = _model(tok, 1)
    save_checkpoint(tmp_path, 4, m, tok, {"state": {"step": 4}})
    path = save_checkpoint(tmp_path, 2, m, tok, {"state": {"step": 2}}, keep=1)
    assert path.is_dir()


def test_weights_of_another_model_are_refused_in_one_line(tmp_path, tok):
    from rlad.checkpoint import CheckpointError, read_checkpoint

    path = save_checkpoint(tmp_path, 1, _model(tok, 1), tok, {"state": {"step": 1}})
    bigger = load_model("preset:tiny-student", tok)
    with pytest.raises(CheckpointError, match=r"step_000001: its weights do not fit the model \(missing .*other "
                                              r"shapes .*\); was it written for another student\?"):
        read_checkpoint(path).load_weights(bigger)
