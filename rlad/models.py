"""Student, teacher and reference models: any ``transformers`` causal LM.

A model is named by a local path or hub id (``from_pretrained``), a GGUF file (a ``.gguf``
path, or a folder holding exactly one: ``rlad.gguf``, dequantized to the run's dtype), a JSON
config file (``config:path.json``, random init) or a built-in preset (``preset:<name>``, random
init; the demo and the tests use these). The fused ops take the decoder's final hidden states and
``get_output_embeddings().weight``; nothing here runs the model's full-logits forward.

``build_models`` makes a run's three: the trained student in float32, and the frozen teacher
and reference (bf16 on GPU), sharded with FSDP2 under torchrun.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rlad_kernels import LMHead
from rlad_kernels.integrations.transformers import decoder_hidden  # noqa: F401  (re-exported)

from . import distributed as D
from .algorithms import POLICY
from .gguf import gguf_config, gguf_model, gguf_source
from .prompting import stop_token_ids
from .runtime import frozen

# Small Llama-style shapes for CPU runs: (hidden, layers, heads, kv heads, intermediate).
PRESETS = {
    "tiny-teacher": (128, 4, 4, 2, 384),
    "tiny-student": (64, 2, 4, 2, 192),
    "micro": (32, 1, 2, 1, 64),
}


def preset_config(name: str, vocab_size: int, max_positions: int = 1024):
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    hidden, layers, heads, kv, inter = PRESETS[name]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                       max_position_embeddings=max_positions, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _hub_id_like(spec: str) -> bool:
    """``name`` or ``namespace/name``: what a Hugging Face Hub id looks like (a local path may too)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None and ".." not in spec


def model_config(spec: str, tokenizer, *, role: str = "model"):
    """The ``transformers`` config of a model spec, without loading its weights: a one-line
    ValueError naming ``role`` and the spec when it cannot be had (a local folder that does not
    exist or holds no ``config.json``, a hub id that cannot be reached, an unreadable JSON)."""
    from transformers import AutoConfig

    if spec.startswith("preset:"):
        return preset_config(spec[len("preset:"):], len(tokenizer))
    if spec.startswith("config:"):
        path = spec[len("config:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return AutoConfig.for_model(**json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{role}: cannot read model config {path!r}: {_one_line(e)}") from None
    check_model_path(spec, role)
    if (src := gguf_source(spec, role)) is not None:
        return gguf_config(src, role)
    local = Path(spec)
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        where = "" if local.is_dir() else " (no such local folder, and not loadable as a Hugging Face Hub id)"
        raise ValueError(f"{role}: cannot load {spec!r}{where}: {_one_line(e)}") from None


def check_model_path(spec: str, role: str) -> None:
    """``spec`` names a model that could load: a folder with ``config.json``, a GGUF (a ``.gguf``
    file, or a folder holding exactly one), or a name that looks like a Hugging Face Hub id (left to
    ``from_pretrained``); a one-line ValueError naming ``role``."""
    local = Path(spec)
    if gguf_source(spec, role) is not None:  # several .gguf in one folder: refused there, naming them
        return
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"{role}: folder {spec!r} has no config.json: it is not a model saved with "
                             f"save_pretrained (nor a folder holding a .gguf file)")
    elif local.exists():
        raise ValueError(f"{role}: {spec!r} is a file; give the model's folder (the one with config.json), or a "
                         f".gguf file")
    elif not _hub_id_like(spec):
        raise ValueError(f"{role}: model folder {spec!r} not found")


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def context_length(config) -> int | None:
    """The longest sequence the model's positions cover (None when its config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(config) -> int | None:
    """The rows of the model's lm_head, as its config says (None when it does not)."""
    for c in (config, getattr(config, "get_text_config", lambda: None)()):
        value = getattr(c, "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(spec: str, tokenizer, *, device="cpu", dtype: torch.dtype | None = None, seed: int = 0,
               role: str = "model"):
    """A causal LM from a path / hub id, a GGUF (dequantized to ``dtype``, float32 when None),
    ``config:<file.json>`` or ``preset:<name>``."""
    from transformers import AutoModelForCausalLM

    if spec.startswith("preset:") or spec.startswith("config:"):
        config = model_config(spec, tokenizer, role=role)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    elif (src := gguf_source(spec, role)) is not None:
        model = gguf_model(src, dtype, role=role)
    else:
        model_config(spec, tokenizer, role=role)  # a clear error for a missing folder or an unreachable hub id
        model = AutoModelForCausalLM.from_pretrained(spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # the run's EOS, and the model's own end-of-turn token(s) where its generation config names others
    stops = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


def check_vocab(student, teacher, tokenizer, teacher_tokenizer=None, *, role: str = "teacher") -> None:
    """Student and teacher must score the same token ids. A teacher with a padded (larger) lm_head
    is fine; a smaller one, or a different tokenizer (``teacher_tokenizer``, when given), is
    refused. ``rlad.preflight.check_tokenizers`` compares the tokenizers before any model is
    loaded; this is the check of the loaded heads."""
    vs = LMHead.of(student).weight.shape[0]
    vt = LMHead.of(teacher).weight.shape[0]
    n = len(tokenizer)
    if vs < n:
        raise ValueError(f"the student's lm_head has {vs} rows but the tokenizer has {n} tokens")
    if vt < vs:
        raise ValueError(f"the {role}'s vocabulary ({vt}) is smaller than the student's ({vs}): they do not "
                         f"share a tokenizer; distillation needs the same token ids on both sides")
    if teacher_tokenizer is not None:
        from .tokenizer import tokenizer_mismatch

        problem = tokenizer_mismatch(tokenizer, teacher_tokenizer, names=("the student's", f"the {role}'s"))
        if problem:
            raise ValueError(f"the {role}'s tokenizer differs from the student's: {problem}; distillation needs the "
                             f"same token ids on both sides")


@dataclass
class Models:
    """A run's models: the trained ``student``, and the frozen ``teacher`` and ``ref`` (None when
    the algorithm does not use them). ``trained_names``: the student's trained parameters, named
    before sharding (what a single-process optimizer state is keyed by)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    ref: torch.nn.Module | None
    trained_names: list[str]


def build_models(cfg, tokenizer, device: torch.device, start=None) -> Models:
    """The student (float32: trained parameters; bf16 autocast on GPU), the teacher when the
    algorithm needs one, and the reference when ``ref_kl_coef > 0`` (``cfg.ref``, else a frozen
    copy of the initial student); frozen models in bf16 on GPU. Under torchrun each is sharded
    with FSDP2, after a single-process checkpoint ``start``'s weights are loaded into the student
    (a sharded checkpoint loads into the sharded student: ``checkpoint.restore``)."""
    alg = cfg.algorithm
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = load_model(cfg.student, tokenizer, device=device, seed=cfg.seed, dtype=torch.float32, role="student")
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()
    teacher = None
    if cfg.loads_teacher:
        teacher = frozen(load_model(cfg.teacher, tokenizer, device=device, seed=cfg.seed + 1, dtype=frozen_dtype,
                                    role="teacher"))
        check_vocab(student, teacher, tokenizer)
    ref = None
    if cfg.ref_kl_coef > 0 and alg.loss == POLICY:  # the reference KL is a term of the policy loss
        ref = frozen(load_model(cfg.ref, tokenizer, device=device, dtype=frozen_dtype, role="ref") if cfg.ref
                     else copy.deepcopy(student).to(frozen_dtype))
        check_vocab(student, ref, tokenizer, role="reference model")
    trained_names = [n for n, p in student.named_parameters() if p.requires_grad]
    if D.state().enabled:
        if start is not None and not start.sharded:
            start.load_weights(student)
        for model, trainable in ((student, True), (teacher, False), (ref, False)):
            if model is not None:  # the model keeps its FSDP2 root (distributed.forward_in)
                D.shard(model, device, trainable=trainable)
    return Models(student, teacher, ref, trained_names)
