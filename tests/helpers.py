"""Shared test utilities: the device, tolerances, deterministic inputs and relative error checks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative error bounds (``rel_err``) against a float64 reference. float32 computation rounds at
# ~6e-8 per operation, a few hundred of them per output; bfloat16 inputs give bfloat16
# gradients, whose 8-bit mantissa rounds at ~4e-3.
TOL = {torch.float32: dict(fwd=5e-6, grad=1e-5), torch.bfloat16: dict(fwd=5e-6, grad=1e-2)}

# dtypes with readable test ids
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (inf/NaN mismatches count as inf)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("inf")
    both = ~torch.isnan(a)
    diff = (a[both] - e[both]).abs().max().item() if both.any() else 0.0
    scale = e[both].abs().max().item() if both.any() else 0.0
    return diff / max(scale, 1e-30) if scale > 0 else diff


def assert_rel(actual, expected, tol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def make_lm_inputs(N, H, V, *, dtype=torch.float32, bias=False, ignore_frac=0.2, lead=None, seed=0,
                   peaked=2.0, device=DEVICE):
    """hidden [*, H], weight [V, H], bias [V], targets [*] with some ignored positions.

    ``peaked`` scales the weight so logits have a realistic spread (a few dominant tokens) rather
    than the near-uniform softmax that plain randn gives."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead is not None else (N,)
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (peaked / H ** 0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, shape, generator=g)
    if ignore_frac > 0:
        drop = torch.rand(shape, generator=g) < ignore_frac
        targets[drop] = -100
    to = dict(device=device, dtype=dtype)
    return (hidden.to(**to), weight.to(**to), b.to(**to) if b is not None else None, targets.to(device))


def kw_id(value):
    """Test id of a keyword-argument dict (``alpha=1.5``); other values keep pytest's own id."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return None


def small_run_config(tmp_path, models, **kw):
    """A TrainConfig for a short real run of the trainer tests' trained echo student and teacher
    (``models``: the trainer conftest's fixture) in ``tmp_path / "run"``; ``kw`` overrides."""
    from rlad.config import TrainConfig

    base = dict(out_dir=str(tmp_path / "run"), student=models["student"], teacher=models["teacher"], task="echo",
                levels=[1], steps=2, prompts_per_step=4, group_size=4, max_new_tokens=6, micro_batch_size=8,
                mini_batches=2, eval_prompts=4, eval_every=0, save_every=0, quiet=True, threads=1, lr=1e-3,
                sft_prompts=16)
    base.update(kw)
    return TrainConfig(**base)


def tiny_lm_config(family: str, vocab_size: int, tie: bool):
    """The config of a tiny random-init causal LM (a few hundred KB) of a ``transformers`` family:
    ``llama``, ``qwen2``, ``qwen3``, ``gemma`` (1), ``gemma2`` (final-logit soft cap 4, so the
    cap matters at the tests' logits) or ``gemma3`` (text-only, soft cap 4)."""
    import transformers

    common = dict(vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=tie)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=48, intermediate_size=96, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=40, intermediate_size=80, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(hidden_size=32, intermediate_size=64, head_dim=8, **common)
    # Gemma: 2 heads of 16, one kv head; Gemma 2/3 soft-cap their final logits: ``c tanh(logits / c)``
    common.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    if family == "gemma":
        return transformers.GemmaConfig(**common)
    if family == "gemma2":
        return transformers.Gemma2Config(final_logit_softcapping=4.0, attn_implementation="eager", **common)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(final_logit_softcapping=4.0, attn_implementation="eager", **common)
    raise ValueError(f"unknown family {family!r}")


# ---------------------------------------------------------------------------- GGUF files
def _gguf_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a Llama q / k projection (``convert_hf_to_gguf.py``'s ``permute``):
    each head's rotary halves interleaved; transformers' GGUF loader undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 64, tie: bool = False, context: int = 256, tokenizer=None):
    """Write a tiny Llama-shaped GGUF (F32 tensors, llama.cpp's names and q / k row order) with the
    built-in tokenizer (or ``tokenizer``) as a ``gpt2`` (byte-level BPE) vocabulary in its metadata
    (plus ``<|endoftext|>``, as a control token, when it lacks one), and return the ``transformers``
    model holding the same weights (float32, eval mode): what the file must load as. Needs the
    ``gguf`` package."""
    import json

    import gguf
    import transformers

    from rlad.tokenizer import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(tok)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"]: t["content"] for t in spec["added_tokens"]}
    for i, text in special.items():
        tokens[i] = text
    assert None not in tokens, "token ids must be contiguous"
    if "<|endoftext|>" not in tokens:  # transformers' byte-level GGUF tokenizer (GPT2Tokenizer) adds it when absent,
        special[len(tokens)] = "<|endoftext|>"  # one token past the model's rows: real files (SmolLM2) have it
        tokens.append("<|endoftext|>")
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      intermediate_size=intermediate, max_position_embeddings=context,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():  # random init gives near-uniform logits and zero-free norms; make both matter
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        if getattr(tok, f"{role}_token_id") is not None:
            add(getattr(tok, f"{role}_token_id"))
    w.add_add_bos_token(False)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _gguf_permute(t, heads)
            elif gg == "attn_k":
                t = _gguf_permute(t, kv_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.contiguous().numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


# ---------------------------------------------------------------------------- policy-loss tests
def leaves(hidden, weight, bias, dtype, device="cpu"):
    """Fresh leaf copies (requires_grad) of hidden, weight and bias in ``dtype`` on ``device``."""
    return [t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in (hidden, weight, bias)]


def rel_finite(actual, expected) -> float:
    """max |actual - expected| / max |expected|, asserting ``actual`` has no NaN."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def ref_gate(A, old, teacher, cfg):
    """Tokens whose teacher term gated TRRD drops: |lp_old - lp_T| > align, or |A| < adv."""
    gate = torch.zeros_like(A, dtype=torch.bool)
    if cfg.teacher_align_threshold is not None:
        gate |= (old - teacher).abs() > cfg.teacher_align_threshold
    if cfg.teacher_adv_threshold is not None:
        gate |= A.abs() < cfg.teacher_adv_threshold
    return gate


def ref_token_log_ratio(lp, A, old, teacher, cfg):
    """The token log-ratio of the specification: GRPO, or TRRD (geometric with its clamp, straight-through
    or not, or arithmetic), the GRPO ratio where gated TRRD drops the teacher term."""
    if teacher is None:
        return lp - old
    if cfg.mixture == "geometric":
        d = lp - teacher
        if cfg.teacher_clamp is not None:
            dc = d.clamp(-cfg.teacher_clamp, cfg.teacher_clamp)
            # straight-through: the clamped value, derivative 1 (as if unclamped)
            d = d + (dc - d).detach() if cfg.teacher_clamp_grad == "straight_through" else dc
        log_r = cfg.alpha * (lp - old) + (1 - cfg.alpha) * d
    else:
        log_r = lp - torch.log(cfg.alpha * old.exp() + (1 - cfg.alpha) * teacher.exp())
    return torch.where(ref_gate(A, old, teacher, cfg), lp - old, log_r)


def run_policy_loss(impl, h, w, b, targets, tok, names, cfg, *, temperature, input_dtype=None, **kw):
    """``linear_policy_loss`` on the leaves' device: the per-token inputs ``names`` of ``tok`` (and
    the advantages and old log-probs) follow them there in their dtype (or ``input_dtype``), tensors
    in ``kw`` too; ``kw``'s ``teacher_weight`` / ``teacher_bias`` become the teacher's LMHead."""
    from rlad_kernels import LMHead, TokenInputs, linear_policy_loss

    t = dict(device=h.device, dtype=input_dtype or h.dtype)
    inputs = TokenInputs(**{n: tok[n].to(**t) for n in ("advantages", "old_logp", *names)})
    kw = {k: (v.to(h.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if "teacher_weight" in kw:
        kw["teacher_head"] = LMHead(kw.pop("teacher_weight"), bias=kw.pop("teacher_bias", None))
    return linear_policy_loss(h, LMHead(w, bias=b), targets.to(h.device), inputs, temperature=temperature,
                              config=cfg, impl=impl, **kw)


ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    """``rlad/tasks/base.py`` -> ``rlad.tasks.base``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def import_graph(package: Path, roots: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules (those under the top-level packages ``roots``) it imports,
    read from the source of every module under ``package``: every import statement, at module
    level or inside a function, ``TYPE_CHECKING`` blocks included; ``from .pkg import module``
    counts the module."""
    graph = {}
    for path in sorted(package.rglob("*.py")):
        name = module_name(path)
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
        graph[name] = {d for d in deps if d.split(".")[0] in roots and d != name}
    return graph
