"""Checkpoints that survive a crash, and are verified before they are trusted.

``out_dir/checkpoints/step_000010/`` holds ``model/`` (``save_pretrained``: loadable by plain
``transformers``, with the tokenizer), ``trainer.pt`` (optimizer, scheduler, RNG states, step,
loop state, config) and ``COMPLETE``: a JSON manifest with the step, the run's config, and the
size and SHA-256 of every other file. A checkpoint is written to a temporary folder, each file
synced to disk, the manifest written last, and the folder renamed into place, so a folder named
``step_*`` is complete unless something damaged it afterwards.

Resuming (``load_latest``) verifies the newest checkpoint against its manifest and reads it whole
into memory before anything is applied; a damaged one (a truncated or altered file, a missing
``model/``, an empty or absent ``COMPLETE``) is reported with a warning, and the previous one is
tried. Once a usable one is found, the damaged newer ones are moved to ``checkpoints/unusable/``
(kept for inspection, never loaded or pruned). Checkpoints written before manifests existed
(``COMPLETE`` holding only the step) still load: they are checked by reading them.

A distributed run (torchrun, FSDP2; ``rlad/distributed.py``) writes *sharded* checkpoints
(``save_sharded_checkpoint``): ``dcp/`` is the model and optimizer state written by every rank
through ``torch.distributed.checkpoint`` (each rank its own shards, plus DCP's ``.metadata``),
``trainer.pt`` the trainer state (rank 0's), and, in the run's last checkpoint, ``model/``: the
consolidated weights gathered to rank 0 (``save_pretrained``, loadable by plain ``transformers``).
The same temporary folder, manifest, rename and verification apply: every rank writes its shards
into the temporary folder, all ranks meet at a barrier, then rank 0 writes ``COMPLETE`` and
renames. DCP reshards on load, so a checkpoint written by N ranks resumes with M ranks, or in a
single process (``load_sharded`` works without a process group).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from .rundir import STEP, UNUSABLE, RunDirError, staged_folder
from .signals import check_writer

MARKER = "COMPLETE"
SHARDED = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged or unreadable), or no usable checkpoint at all."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only, ...); the previous ones are intact."""


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


# ----------------------------------------------------------------------------- writing
def _digest(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` (synced to disk on the way)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MARKER:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _digest(p, sync=True)}
    for d in {folder, *(p.parent for p in folder.rglob("*"))}:
        _fsync_dir(d)
    return files


def _write_failure(final: Path, err: BaseException, free: int | None, previous: Path | None) -> str:
    """One line: which checkpoint could not be written, why in plain words, and what is safe."""
    codes = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
    e: BaseException | None = err
    reason = None
    while e is not None and reason is None:
        reason = codes.get(getattr(e, "errno", None))
        e = e.__cause__ or e.__context__
    if reason is None and free is not None and free < (1 << 20):
        reason = f"the disk is full ({free} bytes free)"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    detail = f"{type(err).__name__}: {first}"[:200]
    reason = f"{reason} ({detail})" if reason else detail
    kept = f"; the previous checkpoint {previous} is intact" if previous else ""
    return f"cannot write checkpoint {final}: {reason}{kept}; free space or fix the folder, then continue with " \
           f"--resume true"


def _fresh(root: Path, tmp: Path) -> None:
    """An empty temporary folder ``tmp`` for a checkpoint under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def _commit(root: Path, tmp: Path, final: Path, marker: dict[str, Any]) -> None:
    """Make the written ``tmp`` the checkpoint ``final``: the ``COMPLETE`` manifest (``marker`` plus
    every file's size and SHA-256), synced, then the rename (a re-run of the same step replaces it)."""
    marker = {**marker, "files": _manifest(tmp)}
    with open(tmp / MARKER, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def _write_error(out_dir, final: Path, err: BaseException) -> CheckpointWriteError:
    """The one-line error of a checkpoint that could not be written: the cause, the free space and
    the intact previous checkpoint."""
    root = final.parent
    try:
        free = shutil.disk_usage(root if root.is_dir() else Path(out_dir)).free
    except OSError:
        free = None
    return CheckpointWriteError(_write_failure(final, err, free, latest_checkpoint(out_dir)))


def save_checkpoint(out_dir, step: int, model, tokenizer, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/step_NNNNNN`` atomically (see the module docstring), then keep the
    ``keep`` newest checkpoints up to this one. A failed write removes its temporary folder and
    raises ``CheckpointWriteError`` naming the checkpoint and the cause; the previous ones are untouched."""
    root = checkpoint_dir(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp-{os.getpid()}"
    check_writer(f"checkpoint {final}")
    try:
        _fresh(root, tmp)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        _commit(root, tmp, final, {"step": step, "config": trainer_state.get("config")})
    except BaseException as err:  # a failure, or a stop that abandons the write: no temporary folder stays
        if not isinstance(err, Exception):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        error = _write_error(out_dir, final, err)  # the free space before the temporary folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from err
    _prune(root, keep, step)
    return final


def _keyed(model) -> torch.nn.Module:
    """The module whose state dict keys a sharded checkpoint uses: the FSDP2 root around the model
    (``model.`` + the model's own keys), or an unsharded stand-in with the same keys."""
    root = model.__dict__.get("_rlad_root")
    if root is None:
        root = torch.nn.Module()
        root.model = model
    return root


def save_sharded_checkpoint(out_dir, step: int, model, optimizer, tokenizer, trainer_state: dict[str, Any],
                            keep: int = 2, export: bool = False) -> Path:
    """A sharded checkpoint (see the module docstring); every rank calls it. ``export``: also the
    consolidated ``model/`` (gathered to rank 0, ``save_pretrained``). A failed write on any rank
    raises ``CheckpointWriteError`` on every rank; the previous checkpoints are untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = D.state().main
    root = checkpoint_dir(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp-{D.broadcast(os.getpid())}"  # rank 0's PID: _prune knows when it is gone
    check_writer(f"checkpoint {final}")

    def begin():
        try:
            _fresh(root, tmp)
        except Exception as err:
            raise _write_error(out_dir, final, err) from err

    D.on_main(begin)
    keyed = _keyed(model)
    error = None
    try:
        msd, osd = get_state_dict(keyed, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED))
        full = D.full_state_dict(keyed) if export else None  # a collective: every rank takes part
        if main:
            torch.save(trainer_state, tmp / "trainer.pt")
            if export:
                _export(model, {k[len("model."):]: v for k, v in full.items()}, tokenizer, tmp / "model")
    except Exception as err:  # every rank learns whether every rank succeeded
        error = f"{type(err).__name__}: {err}"
        print(f"rank {D.state().rank}: checkpoint {final}: {error}", flush=True)
    errors = [e for e in D.all_gather(error) if e]
    if errors:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out_dir, final, RuntimeError("; ".join(errors)))

    def finish():
        try:
            _commit(root, tmp, final, {"step": step, "config": trainer_state.get("config"),
                                       "world_size": D.state().world})
        except Exception as err:
            error = _write_error(out_dir, final, err)
            shutil.rmtree(tmp, ignore_errors=True)
            raise error from err
        _prune(root, keep, step)

    D.on_main(finish)
    return final


def _export(model, weights: dict[str, torch.Tensor], tokenizer, folder: Path) -> None:
    """``save_pretrained`` of a full state dict into ``folder`` (with the tokenizer), through a
    fresh unsharded copy of the model built from its config."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights)
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_sharded(path, model, optimizer) -> None:
    """Read a sharded checkpoint's ``dcp/`` into ``model`` and ``optimizer`` (FSDP2-sharded, on
    any number of ranks, or plain in a single process: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    keyed = _keyed(model)
    msd, osd = get_state_dict(keyed, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=str(Path(path) / SHARDED))
    except Exception as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: its sharded state cannot be read into this model: {type(e).__name__}: "
                              f"{first}"[:400]) from None
    set_state_dict(keyed, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


EXPORT_MARKER = "rlad-export.json"  # in a folder rlad export wrote: only such a folder is ever replaced


def check_export_target(path, out, *, overwrite: bool = False, marker: str = EXPORT_MARKER,
                        writer: str = "rlad export", source: str = "checkpoint") -> None:
    """``rlad export`` (or another ``writer`` of a model folder, whose folders hold ``marker``) may
    write ``out``: it is not the ``source`` ``path``, inside it, or a folder holding it; and it is
    absent or empty, or (``overwrite``) an earlier folder of the same writer. ``CheckpointError``
    naming ``--out`` otherwise."""
    from .rundir import check_inputs

    path, out = Path(path), Path(out)
    check_inputs(out, {source: str(path)}, setting="--out")
    if path.exists() and path.resolve() in out.resolve().parents:
        raise CheckpointError(f"--out={str(out)!r}: is inside the {source} {path}; rlad never writes where its "
                              f"inputs are: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out={str(out)!r}: is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"--out={str(out)!r}: is not empty; choose a new or empty folder, or add --overwrite "
                              f"to replace an earlier {writer} there")
    if not (out / marker).is_file():
        raise CheckpointError(f"--out={str(out)!r}: is not an earlier {writer} (it has no {marker}), so "
                              f"--overwrite may not replace it: rlad never deletes what it did not write; choose "
                              f"another --out")


def export_checkpoint(path, out, *, overwrite: bool = False) -> Path:
    """``rlad export``: the model of a checkpoint (sharded or not) as a ``save_pretrained`` folder
    ``out`` with its tokenizer, in one process (a sharded one is read through DCP, no process
    group needed; the student is rebuilt from the checkpoint's config first). Written to a
    temporary folder beside ``out`` and renamed into place, with ``rlad-export.json`` (the
    checkpoint and its step); ``out`` must be new or empty, or an earlier export (``overwrite``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from .models import load_model
    from .runtime import tokenizer_for

    path, out = Path(path), Path(out)
    check_export_target(path, out, overwrite=overwrite)
    info = verify(path)
    with staged_folder(out, replace=overwrite) as tmp:
        if not (path / SHARDED).is_dir():  # a single-process checkpoint: its model/ is the export
            shutil.copytree(path / "model", tmp)
        else:
            trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
            cfg = trainer.get("config") or {}
            if not cfg.get("student"):
                raise CheckpointError(f"{path}: trainer.pt records no config (student), so the model cannot be "
                                      f"rebuilt")
            tok = tokenizer_for(cfg["student"], cfg.get("tokenizer"))
            model = load_model(cfg["student"], tok, seed=cfg.get("seed", 0), dtype=torch.float32, role="student")
            keyed = _keyed(model)
            state = {"model": get_model_state_dict(keyed)}
            dcp.load(state, checkpoint_id=str(path / SHARDED))
            set_model_state_dict(keyed, state["model"])
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        record = {"format": 1, "checkpoint": str(path.resolve()), "step": info.get("step")}
        (tmp / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_plain_optimizer(model, optimizer, saved: dict[str, Any], names: list[str]) -> None:
    """A single-process checkpoint's optimizer state (keyed by parameter index, ``names`` the
    trained parameters' names in that order) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    keyed = [f"model.{n}" for n in names]
    full = {"state": {keyed[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [keyed[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(_keyed(model), optimizer, full, options=StateDictOptions(full_state_dict=True))


def _prune(root: Path, keep: int, newest: int) -> None:
    """Keep the ``keep`` newest checkpoints up to step ``newest`` (the one just written); remove
    the temporary folders of saves whose process is gone."""
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP.match(p.name)))
    older = [p for s, p in done if s <= newest]
    for p in older[:-keep] if keep > 0 else []:
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


# ----------------------------------------------------------------------------- reading
def checkpoints(out_dir) -> list[Path]:
    """Every ``step_*`` folder, newest first (complete or not)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP.match(p.name))), reverse=True)
    return [p for _, p in found]


def latest_checkpoint(out_dir) -> Path | None:
    """The newest checkpoint with a ``COMPLETE`` marker and a ``trainer.pt`` (not verified: see ``verify``)."""
    return next((p for p in checkpoints(out_dir) if (p / MARKER).is_file() and (p / "trainer.pt").is_file()), None)


def verify(path) -> dict[str, Any]:
    """The checkpoint's manifest, after checking its files against it: presence and size, then
    SHA-256. Raises ``CheckpointError`` naming the checkpoint and the first problem found."""
    path = Path(path)

    def bad(problem: str):
        raise CheckpointError(f"{path}: {problem}")

    if not path.is_dir():
        bad("not a folder")
    marker = path / MARKER
    if not marker.is_file():
        bad(f"no {MARKER} marker: an interrupted or damaged checkpoint")
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        bad(f"its {MARKER} marker is empty or not valid JSON")
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        bad(f"its {MARKER} marker holds no step")
    if path.name != f"step_{info['step']:06d}":
        bad(f"its {MARKER} marker is for step {info['step']}")
    files = info.get("files")
    if files is None:  # written before manifests: check what can be checked without reading
        for rel in ("model/config.json", "trainer.pt"):
            if not (path / rel).is_file():
                bad(f"{rel} is missing")
        if not any((path / "model").glob("*.safetensors")):
            bad("model/ holds no .safetensors weights")
        return info
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            bad(f"{rel} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            bad(f"{rel} has {size} bytes, {meta['size']} were written (truncated or overwritten)")
    for rel, meta in files.items():
        if _digest(path / rel) != meta["sha256"]:
            bad(f"{rel} is corrupted: its SHA-256 differs from the one recorded when it was written")
    return info


@dataclass
class Checkpoint:
    """A verified checkpoint read whole into memory: the model's weights and the trainer state."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor] | None  # None: a sharded checkpoint (``dcp/``, read by ``load_sharded``)
    trainer: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.weights is None

    def load_weights(self, model) -> None:
        """Copy the weights into ``model`` in place, in the model's own dtypes."""
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(self.weights)), sorted(set(self.weights) - set(own))
        mismatched = sorted(k for k in set(own) & set(self.weights) if own[k].shape != self.weights[k].shape)
        if missing or unexpected or mismatched:
            raise CheckpointError(f"{self.path}: its weights do not fit the model (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}, other shapes {mismatched[:3]}); was it written for another "
                                  f"student?")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.weights.items()})


def read_checkpoint(path, check: bool = True) -> Checkpoint:
    """Verify the checkpoint, then read its weights and trainer state into memory (nothing is
    applied: a checkpoint that fails half-way leaves the caller's model untouched). A sharded
    checkpoint's weights stay on disk (``load_sharded`` reads them into the sharded model).
    ``check=False``: no verification (the other ranks of a run whose rank 0 verified it)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    info = verify(path) if check else {"step": int(STEP.match(path.name).group(1))}
    try:
        if (path / SHARDED).is_dir():
            weights = None
        else:
            loaded = AutoModelForCausalLM.from_pretrained(path / "model")
            weights = loaded.state_dict()
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # any failure to read a damaged file
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: cannot be read: {type(e).__name__}: {first}"[:400]) from None
    if not isinstance(trainer, dict) or not isinstance(trainer.get("state"), dict):
        raise CheckpointError(f"{path}: trainer.pt holds no trainer state")
    return Checkpoint(path, info["step"], weights, trainer)


def load_checkpoint(path, model) -> dict[str, Any]:
    """Load the model weights in place; return the trainer state (optimizer, scheduler, RNG, ...)."""
    ck = read_checkpoint(path)
    ck.load_weights(model)
    return ck.trainer


def set_aside(path: Path) -> Path:
    """Move an unusable checkpoint to ``checkpoints/unusable/`` (never loaded or pruned there)."""
    dest_dir = path.parent / UNUSABLE
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / path.name, 1
    while dest.exists():
        n += 1
        dest = dest_dir / f"{path.name}.{n}"
    os.replace(path, dest)
    return dest


def load_latest(out_dir, check_config: Callable[[dict[str, Any], Path], None] | None = None) -> Checkpoint | None:
    """The newest usable checkpoint of the run in ``out_dir``, read into memory; None when there
    is none at all. Each damaged one is reported with a warning and the previous one is tried;
    once one is usable, the damaged newer ones are set aside (``checkpoints/unusable/``). With
    checkpoints but none usable, raises ``CheckpointError`` listing each one's problem.
    ``check_config(config, path)`` may refuse a checkpoint's settings (its error propagates)."""
    problems = []
    for path in checkpoints(out_dir):
        try:
            info = verify(path)
            if check_config is not None and isinstance(info.get("config"), dict):
                check_config(info["config"], path)
            ck = read_checkpoint(path)
            if check_config is not None and not isinstance(info.get("config"), dict):  # an older checkpoint
                check_config(ck.trainer.get("config") or {}, path)
        except CheckpointError as err:
            problems.append((path, err))
            print(f"warning: checkpoint unusable: {err}; trying the previous one", flush=True)
            continue
        for bad, _ in problems:
            moved = set_aside(bad)
            print(f"warning: moved the unusable checkpoint {bad.name} to {moved}; resuming from {path.name}",
                  flush=True)
        return ck
    if problems:
        listed = "; ".join(str(err) for _, err in problems)
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(out_dir)} ({listed}); the run cannot be "
                              f"continued: start it over with --overwrite true, or use another --out-dir")
    return None


def resume_point(cfg) -> Checkpoint | None:
    """The checkpoint a run (``TrainConfig`` ``cfg``) continues from: the newest usable one
    (damaged ones are skipped with a warning), read into memory. Its settings must match ``cfg``
    except for the safe ones (``RESUME_SAFE``) unless ``force_resume``; ``steps`` may not end
    before it. None when the run has no checkpoint yet (it starts from step 0, if its
    config.json matches)."""
    out = Path(cfg.out_dir)

    def check(saved: dict, where: Path) -> None:
        changes = cfg.resume_changes(saved)
        if changes and not cfg.force_resume:
            raise RunDirError(f"resume: settings differ from those {where} was written with, in ways that change the "
                              f"run: {'; '.join(changes)}; resume with the same settings, or add --force-resume "
                              f"true to continue with the new ones, or start a new run (--overwrite true or another "
                              f"--out-dir)")
        if changes:
            print(f"warning: resume: continuing with changed settings (force_resume): {'; '.join(changes)}",
                  flush=True)

    ckpt = load_latest(out, check)
    if ckpt is None:
        if (out / "config.json").is_file():
            try:
                saved = json.loads((out / "config.json").read_text())
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict):
                check(saved, out / "config.json")
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
        return None
    if ckpt.step > cfg.steps:
        raise RunDirError(f"resume: config: steps={cfg.steps} ends before the checkpoint {ckpt.path} (step "
                          f"{ckpt.step}); set steps >= {ckpt.step}")
    return ckpt


def resume_hint(out_dir) -> str:
    """Where a stopped run can continue from, in a line."""
    last = latest_checkpoint(out_dir)
    if last is None:
        return f"no checkpoint in {out_dir} yet: --resume true starts it again from step 0"
    return f"the last checkpoint is {last}: continue with --resume true (same settings, out_dir {out_dir})"


def restore(start: Checkpoint, student, optimizer, scheduler, data_rng: random.Random, state: dict,
            trained_names: list[str]) -> None:
    """Continue a run from ``start``: the optimizer, the schedule, the data stream and the loop
    state, and the student's weights (a sharded checkpoint into the sharded student; under
    torchrun, a single-process checkpoint's weights were loaded before sharding by
    ``models.build_models``)."""
    dist = D.state()
    if start.sharded:  # torch.distributed.checkpoint reshards to this run's ranks (or one process)
        load_sharded(start.path, student, optimizer)
    elif dist.enabled:  # a single-process checkpoint: weights loaded before sharding, the optimizer here
        load_plain_optimizer(student, optimizer, start.trainer["optimizer"], trained_names)
    else:
        start.load_weights(student)
        optimizer.load_state_dict(start.trainer["optimizer"])
    scheduler.load_state_dict(start.trainer["scheduler"])
    set_rng_state(start.trainer["rng"], data_rng)
    state.update(start.trainer["state"])
    saved_world = start.trainer.get("world_size", 1)
    if saved_world != dist.world or bool(start.trainer.get("distributed")) != dist.enabled:
        print(f"note: resuming on {dist.world} rank(s) from a checkpoint written on {saved_world}: the prompts "
              f"and their sampling seeds continue exactly; float sums (all-reduce order) and, with "
              f"mini_batches > 1, the mini-batch split follow the new world size"
              + ("" if dist.enabled == bool(start.trainer.get("distributed")) else
                 "; sampling switches between per-prompt seeds (torchrun) and torch's global stream (one "
                 "process)"), flush=True)
    print(f"resumed from {start.path} at step {state['step']}", flush=True)


def save_run(cfg, step: int, last: bool, student, optimizer, scheduler, data_rng: random.Random, state: dict,
             tokenizer) -> None:
    """The run's checkpoint at ``step``: under torchrun every rank writes its shards (the last
    checkpoint also gets the consolidated ``model/``); one process writes the whole state."""
    trainer_state = {"scheduler": scheduler.state_dict(), "rng": rng_state(data_rng), "state": dict(state),
                     "config": cfg.to_dict()}
    dist = D.state()
    if dist.enabled:
        save_sharded_checkpoint(cfg.out_dir, step, student, optimizer, tokenizer, {
            **trainer_state, "world_size": dist.world, "distributed": True}, keep=cfg.keep_checkpoints, export=last)
    else:
        save_checkpoint(cfg.out_dir, step, student, tokenizer, {"optimizer": optimizer.state_dict(), **trainer_state},
                        keep=cfg.keep_checkpoints)
