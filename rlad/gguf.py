"""GGUF checkpoints (llama.cpp's single-file format) wherever a model is accepted.

A model spec names a GGUF when it is a ``.gguf`` file, or a folder without ``config.json`` that
holds exactly one ``.gguf`` (a folder with several is refused: the spec must name the file). A
folder with ``config.json`` is an ordinary ``save_pretrained`` folder, even if a ``.gguf`` lies
beside it. ``transformers`` reads the config, the tokenizer and the weights from the file
(``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package); the weights are
dequantized to a plain dense model in the dtype asked for, and the loaded model carries no trace of
the quantization (``plain``), so ``save_pretrained`` (a checkpoint, ``rlad fetch``'s conversion)
writes an ordinary folder.

This module imports nothing of rlad: the tokenizer, the models and the preflight all use it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".gguf"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file: ``folder`` and ``name`` as ``from_pretrained(folder, gguf_file=name)`` takes them."""

    folder: str
    name: str

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.name


def gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())


def gguf_source(spec, role: str = "model") -> GGUFSource | None:
    """The GGUF that ``spec`` names, or None when it names none (an ordinary folder, a hub id, a
    ``preset:`` or ``config:`` spec, a missing path). A folder without ``config.json`` that holds
    several ``.gguf`` files is a one-line ValueError naming ``role``."""
    if spec is None:
        return None
    spec = str(spec)
    if spec.startswith(("preset:", "config:")):
        return None
    p = Path(spec)
    if p.is_file() and p.suffix.lower() == SUFFIX:
        return GGUFSource(str(p.parent), p.name)
    if p.is_dir() and not (p / "config.json").is_file():
        found = gguf_files(p)
        if len(found) == 1:
            return GGUFSource(str(p), found[0].name)
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"{role}: folder {spec!r} holds {len(found)} .gguf files ({names}); name the one to "
                             f"load: {p / found[0].name}")
    return None


def is_gguf(spec) -> bool:
    """``spec`` names a GGUF (several in one folder count: loading it then fails with their names)."""
    try:
        return gguf_source(spec) is not None
    except ValueError:
        return True


def require_gguf(spec, role: str = "model") -> None:
    """transformers reads a GGUF with the ``gguf`` package (and, from 5.x, ``accelerate``): a
    one-line ValueError naming what is missing and how to install it."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{role}: {str(spec)!r} is a GGUF file, which transformers reads with the "
                         f"{' and '.join(missing)} package(s); install them: pip install {' '.join(missing)} "
                         f"(both are in rlad[train])")


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def gguf_config(src: GGUFSource, role: str = "model"):
    """The ``transformers`` config the file describes (its metadata only; no tensor is read)."""
    from transformers import AutoConfig

    require_gguf(src.path, role)
    try:
        return AutoConfig.from_pretrained(src.folder, gguf_file=src.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{role}: cannot read the GGUF {str(src.path)!r}: {_one_line(e)}") from None


def gguf_tokenizer(src: GGUFSource, role: str = "tokenizer"):
    """The tokenizer the file describes (its vocabulary, merges, special tokens and chat template)."""
    from transformers import AutoTokenizer

    require_gguf(src.path, role)
    return AutoTokenizer.from_pretrained(src.folder, gguf_file=src.name)


def gguf_model(src: GGUFSource, dtype=None, role: str = "model", **kw):
    """The causal LM of the file, dequantized to ``dtype`` (float32 when None) and made ``plain``.
    ``kw`` go to ``from_pretrained`` (``trust_remote_code``, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    require_gguf(src.path, role)
    kw["dtype"] = dtype if dtype is not None and dtype != "auto" else torch.float32
    try:  # transformers >= 5 can keep GGUF blocks packed (GgufConfig); rlad trains and scores dense weights
        from transformers import GgufConfig

        kw.setdefault("quantization_config", GgufConfig(dequantize=True))
    except ImportError:  # earlier releases always dequantize
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.name, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{role}: cannot load the GGUF {str(src.path)!r}: {_one_line(e)}") from None
    return plain(model)


def plain(model):
    """``model`` as an ordinary dense model: without the GGUF quantizer and ``quantization_config``
    that ``from_pretrained`` leaves on it (``save_pretrained`` refuses a model "quantized with gguf",
    and a saved ``quantization_config`` would send the folder back through the GGUF loader)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False) is True and "is_quantized" in vars(model):  # transformers 4.x
        model.is_quantized = False
    for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    return model
