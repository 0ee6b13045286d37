"""Atomic checkpoints: a complete one round-trips and loads with plain transformers; a
half-written one is never picked up."""

import random

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
