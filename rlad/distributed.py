"""Data-parallel ``rlad train`` on PyTorch's own stack: ``torchrun``, FSDP2, ``torch.distributed``.

``torchrun --nproc-per-node N -m rlad train ...`` (one or many nodes) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``; ``init`` joins the process
group from them (``env://``; gloo on CPU, nccl on CUDA, ``LOCAL_RANK`` picks the GPU) with a
timeout (``dist_timeout``), so a rank stuck in a collective fails instead of hanging. Without
those variables nothing here does anything: the run is today's single process, bit for bit.

What each rank does:

* **Data.** Every rank draws the step's *global* prompts from the same data RNG and keeps its
  contiguous slice (``prompts_per_step / world`` prompts, each with its whole group, so group
  advantages need no communication). Sampling is seeded per prompt and response from
  ``(seed, step, global prompt index)`` plus the response's index (``row_seed``,
  ``rollout.SeededSampler``), so the global batch is the same whatever the world size.
* **Models.** ``shard`` wraps a model in ``Root`` (a module whose forward runs a function of the
  model) and applies FSDP2 ``fully_shard`` to every decoder layer, then to the root, which owns
  the embedding, the final norm and the lm_head (tied or not). The fused loss reads the lm_head
  weight directly, so it must run where FSDP2 has that weight unsharded: inside the root's
  forward. ``forward_in(model, fn)`` runs ``fn(model)`` there (scoring, the loss), and
  ``generate_in`` too, with the whole model gathered once for a ``generate`` call; on an
  unsharded model both are just ``fn(model)``. The student's root reshards after each forward
  (and gathers again in its backward); the frozen teacher's and reference model's roots stay
  gathered after their first forward (they have no backward to regather in, and the divergence
  losses keep the teacher's head for the student's backward). FSDP2 averages gradients over ranks;
  the loss is a sum over ranks (each divided by the global normalizer), so each rank's backward
  runs on ``world x`` its loss (``micro_loss``). A divide factor of 1 (``set_gradient_divide_factor``)
  would say it directly, but it needs ``ReduceOp.PREMUL_SUM``, which gloo does not have.
* **Reductions.** The loss normalizer and every logged metric are sums and counts all-reduced
  over ranks (``all_sum``), so the loss is the one a single process computes on the global batch
  (up to float summation order). Evaluation is not sharded: every rank evaluates the whole eval
  set in step (FSDP needs every rank in each forward) and rank 0 logs it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# test hooks: make rank RLAD_FAIL_RANK fail at step RLAD_FAIL_STEP (see fail_hook)
FAIL_STEP, FAIL_RANK, FAIL_MODE = "RLAD_FAIL_STEP", "RLAD_FAIL_RANK", "RLAD_FAIL_MODE"


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank ``rank`` of ``world`` (``enabled`` when torchrun started it)."""

    enabled: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_STATE = Dist()


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE"))


def init(device: torch.device, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the process group of a torchrun launch (``env://``) and pick this rank's device;
    without torchrun's variables, return the single-process state and ``device`` unchanged."""
    global _STATE
    if not launched():
        _STATE = Dist()
        return _STATE, device
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} has LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                               f"visible CUDA device(s): start at most that many processes per node "
                               f"(--nproc / --nproc-per-node), or train on the CPU with --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    _STATE = Dist(True, rank, world, local)
    return _STATE, device


def check_launch(prompts_per_step: int, rows_per_prompt: int = 1, mini_batches: int = 1) -> None:
    """Before any work in a torchrun launch: ``prompts_per_step`` must divide among the ranks, and
    each rank's share of the batch (``prompts_per_step / world`` prompts of ``rows_per_prompt``
    rows each: the group size, or 1 for sft) must fill ``mini_batches`` mini-batches, since each
    rank splits its own rows (a ValueError on every rank otherwise); then only rank 0 prints (the
    other ranks' stdout goes to /dev/null; their errors still reach stderr)."""
    import sys

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if prompts_per_step % world:
        raise ValueError(f"config: prompts_per_step={prompts_per_step}: must be divisible by the number of ranks "
                         f"({world}), so that every rank samples the same number of prompts (each with its whole "
                         f"group)")
    rows = prompts_per_step // world * rows_per_prompt
    if rows < mini_batches:
        raise ValueError(f"config: mini_batches={mini_batches}: each of the {world} ranks holds {rows} rows of a "
                         f"step's batch (prompts_per_step={prompts_per_step} / {world} ranks"
                         f"{f' x group_size={rows_per_prompt}' if rows_per_prompt > 1 else ''}) and splits them "
                         f"into mini_batches itself; set mini_batches <= {rows}, or raise prompts_per_step")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)


def state() -> Dist:
    return _STATE


def close() -> None:
    global _STATE
    import torch.distributed as dist

    if _STATE.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _STATE = Dist()


# ----------------------------------------------------------------------------- collectives
def _all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    """``x`` reduced over ranks with ``op`` ("SUM", "MAX"): a new tensor on ``x``'s device."""
    import torch.distributed as dist

    y = x.detach().clone()
    if dist.get_backend() == "nccl" and not y.is_cuda:  # nccl reduces GPU tensors only
        y = y.cuda()
    dist.all_reduce(y, op=getattr(dist.ReduceOp, op))
    return y.to(x.device)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks (a new tensor; ``x`` itself when not distributed)."""
    return _all_reduce(x, "SUM") if _STATE.enabled else x


def all_max(n: int) -> int:
    """The largest of the ranks' ``n`` (``n`` itself when not distributed)."""
    return int(_all_reduce(torch.tensor([n]), "MAX").item()) if _STATE.enabled else n


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not _STATE.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * _STATE.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not _STATE.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _STATE.enabled:
        import torch.distributed as dist

        dist.barrier()


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result to every rank; an exception raised on rank 0
    is raised on every rank (same type when it is a ValueError / OSError, so every rank reports it
    the same way), so no rank waits for a decision that never comes."""
    if not _STATE.enabled:
        return fn()
    result, error = None, None
    if _STATE.main:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = e
        except Exception as e:  # reported on every rank
            error = RuntimeError(f"rank 0: {type(e).__name__}: {e}")
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


# ----------------------------------------------------------------------------- sampling seeds
def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, the step, a global prompt index, a response
    index), the same on every rank and in every process."""
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def my_slice(n: int) -> slice:
    """This rank's contiguous share of ``n`` global items (``n`` divisible by the world size)."""
    per = n // _STATE.world
    return slice(_STATE.rank * per, (_STATE.rank + 1) * per)


# ----------------------------------------------------------------------------- sharding
class Root(torch.nn.Module):
    """The FSDP2 root around a model: ``root(fn, *args)`` runs ``fn(model, *args)`` inside the
    root's forward, where the parameters the root owns (embedding, final norm, lm_head) are
    gathered. The model keeps a reference to it (``forward_in``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        model.__dict__["_rlad_root"] = self  # not a submodule: no cycle in the module tree

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def forward_in(model, fn: Callable, *args, **kwargs):
    """``fn(model, *args, **kwargs)``, inside the FSDP2 root's forward when ``model`` is sharded."""
    root = model.__dict__.get("_rlad_root") if model is not None else None
    if root is None:
        return fn(model, *args, **kwargs)
    return root(fn, *args, **kwargs)


def generate_in(model, fn: Callable, *args, **kwargs):
    """``forward_in`` for generation: a sharded model's layers are gathered once for the whole call
    (not once per generated token, which would all-gather every layer at every token) and
    resharded after it; for that call every rank holds the whole model (in the student's compute
    dtype)."""
    root = model.__dict__.get("_rlad_root") if model is not None else None
    if root is None:
        return fn(model, *args, **kwargs)
    units = root.__dict__["_rlad_units"]  # [(FSDP unit, its reshard_after_forward)], set by shard
    root.set_reshard_after_forward(False)
    try:
        return root(fn, *args, **kwargs)
    finally:
        for m, reshard in units:
            m.set_reshard_after_forward(reshard, recurse=False)
            if reshard:
                m.reshard()


def is_sharded(model) -> bool:
    return model is not None and model.__dict__.get("_rlad_root") is not None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's repeated blocks (``model.model.layers`` for Llama-style models)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks", "block"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard (looked for "
                     f"layers / h / blocks)")


def shard(model: torch.nn.Module, device: torch.device, *, trainable: bool) -> Root:
    """FSDP2: every decoder layer, then the root (embedding, final norm, lm_head; a tied head is one
    parameter). On CUDA the trained student computes in bf16 and reduces gradients in fp32
    (``MixedPrecisionPolicy``); on CPU no policy (float32 throughout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (_STATE.world,))
    kw: dict[str, Any] = {"mesh": mesh}
    if trainable and device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **kw)
    root = Root(model)
    fully_shard(root, reshard_after_forward=trainable, **kw)
    root.__dict__["_rlad_units"] = [*((layer, True) for layer in layers), (root, trainable)]
    return root


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict gathered to rank 0, on the CPU (empty on other ranks); every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def fail_hook(step: int) -> None:
    """Test hook: rank ``RLAD_FAIL_RANK`` fails at step ``RLAD_FAIL_STEP``: raises, or exits at once
    with ``RLAD_FAIL_MODE=exit`` (as a killed process would), or hangs with ``RLAD_FAIL_MODE=hang``."""
    import sys

    if os.environ.get(FAIL_STEP) is None or int(os.environ[FAIL_STEP]) != step:
        return
    if int(os.environ.get(FAIL_RANK, "0")) != _STATE.rank:
        return
    if os.environ.get(FAIL_MODE) == "exit":
        print(f"rank {_STATE.rank}: test hook: exiting at step {step}", file=sys.stderr, flush=True)
        os._exit(1)
    if os.environ.get(FAIL_MODE) == "hang":  # the other ranks wait in a collective until dist_timeout
        import time

        print(f"rank {_STATE.rank}: test hook: hanging at step {step}", file=sys.stderr, flush=True)
        time.sleep(10**6)
    raise RuntimeError(f"test hook: rank {_STATE.rank} fails at step {step}")
