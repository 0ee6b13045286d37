"""Setup shared by ``rlad train``, ``rlad eval`` and ``rlad demo``: device, autocast, progress bars,
tokenizer choice, frozen models."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from .tokenizer import ASSET, load_tokenizer

__all__ = ["autocast_for", "frozen", "progress", "resolve_device", "tokenizer_for"]


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config: device={spec!r} but CUDA is not available; use device=cpu or auto")
    return dev


def autocast_for(dtype: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A context-manager factory: bf16 autocast for ``dtype="bfloat16"``, or ``"auto"`` on CUDA; else none."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def progress(quiet: bool, **kw):
    """A progress bar on a terminal; nothing when ``quiet`` or when the output is not a terminal
    (log files get the per-step lines instead)."""
    from tqdm.auto import tqdm

    return tqdm(disable=True if quiet else None, dynamic_ncols=True, **kw)


def tokenizer_spec(model: str, tokenizer: str | None = None) -> str | None:
    """Which tokenizer a run of ``model`` uses: the one given, else the model's when it is a path
    or hub id, else None: the built-in one (``preset:`` and ``config:`` models are built for it)."""
    if tokenizer is None and not model.startswith(("preset:", "config:")):
        return model
    return tokenizer


def tokenizer_for(model: str, tokenizer: str | None = None):
    """The run's tokenizer (``tokenizer_spec``), loaded; one without an EOS token is refused (every
    response ends with EOS, where generation stops; a tokenizer without a pad token pads with it)."""
    spec = tokenizer_spec(model, tokenizer)
    tok = load_tokenizer(spec)
    if tok.eos_token_id is None:
        nor = "" if tok.pad_token is not None else ", nor a pad token"
        raise ValueError(f"the tokenizer {str(spec or ASSET)!r} has no EOS token (eos_token{nor}): every response "
                         f"ends with EOS, where generation stops; use a tokenizer that sets eos_token (in its "
                         f"tokenizer_config.json)")
    return tok


def frozen(model):
    """``model`` in eval mode with no parameter requiring a gradient (teacher, reference)."""
    model.requires_grad_(False)
    return model.eval()
