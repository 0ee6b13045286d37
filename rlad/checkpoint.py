"""Checkpoints that survive a crash: written to a temporary folder, then renamed into place.

``out_dir/checkpoints/step_000010/`` holds ``model/`` (``save_pretrained``: loadable by plain
``transformers``, with the tokenizer), ``trainer.pt`` (optimizer, scheduler, RNG states, step,
loop state) and ``COMPLETE``. Only folders with ``COMPLETE`` count, so a checkpoint that was
being written when the process died is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state(data_rng: random.Random) -> dict[str, Any]:
    state = {"python": data_rng.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_rng: random.Random) -> None:
    data_rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step: int, model, tokenizer, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    torch.save(trainer_state, tmp / "trainer.pt")
    with open(tmp / "COMPLETE", "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-run of the same step replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)))
    for _, p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # leftovers of interrupted saves
        if p.name.startswith(".step_") and ".tmp-" in p.name and not _alive(p.name.rsplit("-", 1)[-1]):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def latest_checkpoint(out_dir) -> Path | None:
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return None
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP.match(p.name)) and (p / "COMPLETE").is_file() and (p / "trainer.pt").is_file())
    return done[-1][1] if done else None


def load_checkpoint(path, model) -> dict[str, Any]:
    """Load the model weights in place; return the trainer state (optimizer, scheduler, RNG, ...)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    loaded = AutoModelForCausalLM.from_pretrained(path / "model")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in loaded.state_dict().items()})
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
