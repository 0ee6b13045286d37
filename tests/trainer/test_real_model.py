"""The fused ops are exact on real weights: SmolLM2-135M-Instruct (``rlad fetch smollm2``).

``tests/ops/test_transformers_logits.py`` checks the ops against ``transformers``' own logits on
tiny random models; this runs the same comparison on a real pretrained model, on chat-formatted
prompts with responses: ``linear_logprobs`` (``impl="torch"`` on every token, ``impl="triton"`` in
Triton's CPU interpreter on a slice of tokens) and the fused ``linear_policy_loss`` (its log-probs,
and its loss against the loss's torch math on the reference log-probs), in float32 and bfloat16.
The reference is ``log_softmax`` (float64) of the model's own logits.

The model is the folder (or ``.gguf`` file) named by ``$RLAD_REAL_MODEL``, else ``rlad fetch smollm2``'s in the cache
(``$RLAD_CACHE``, else ``~/.cache/rlad``); without either the test is skipped, saying how to get
it. About 40 s on 2 CPU cores.

Tolerance, from the dtype: the model rounds its logits to the dtype (by at most u|z|, u = eps/2,
in the target's logit and in every logit of the log-sum-exp: at most eps * max|z| in a log-prob),
while the ops keep float32 logits from the same inputs; on top of that, both sides compute in
float32 (dot products over H = 576 in another order, the log-sum-exp over 49152 logits), which
is a few float32 eps of max|z| (3.2 measured; 16 allowed, the summation order being the BLAS's):
``tol = (eps(dtype) + 16 eps(float32)) * max|z|``. In bfloat16 the first term is the bound (0.56 of
it measured).
"""

import os
from pathlib import Path

import pytest
import torch

from rlad.fetch import FOLDER, MANIFEST, cache_root
from rlad_kernels import LMHead, PolicyLossConfig, TokenInputs, linear_logprobs, linear_policy_loss
from rlad_kernels.ops.common.launch import triton_config
from rlad_kernels.ops.policy_loss.math import policy_token_loss

CONVERSATIONS = [
    ("What is 17 + 25? End with #### and the answer.", "17 + 25 = 42.\n#### 42"),
    ("Write one sentence about the sea.", "The sea is wide and deep, and it never stops moving."),
]
TRITON_TOKENS = 16  # the interpreter's slice (block_v 4096: 12 vocabulary tiles per token block)


def _real_model() -> Path:
    named = os.environ.get("RLAD_REAL_MODEL")
    if named:
        assert Path(named).exists(), f"RLAD_REAL_MODEL={named!r}: no such folder or .gguf file"
        return Path(named)
    folder = cache_root() / "smollm2" / FOLDER
    if not (folder / MANIFEST).is_file():
        pytest.skip(f"no real model: {folder} does not hold a finished `rlad fetch smollm2` (run it once, ~100 MB "
                    f"download, ~30 s), or set RLAD_REAL_MODEL to a converted folder")
    return folder


@pytest.fixture(scope="module")
def real():
    from rlad.models import load_model
    from rlad.tokenizer import load_tokenizer

    folder = _real_model()
    tok = load_tokenizer(folder)
    model = load_model(str(folder), tok, dtype=torch.float32).eval()
    # the chat template writes its own <|im_start|> markers: no BOS added in front (SmolLM2's BOS is <|im_start|>)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in CONVERSATIONS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return model, tok, enc.input_ids, enc.attention_mask


def _tol(dtype, zmax: float) -> float:
    return (torch.finfo(dtype).eps + 16 * torch.finfo(torch.float32).eps) * zmax


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_ops_match_the_model_logits_on_real_weights(real, dtype):
    model, tok, ids, attn = real
    model = model.to(dtype)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1]  # after the final norm: what the lm_head consumes
    logits = out.logits[:, :-1].double()  # the model's own logits, rounded to dtype
    targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
    valid = targets != -100
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    zmax = logits[valid].abs().max().item()
    tol = _tol(dtype, zmax)
    head = LMHead(model.get_output_embeddings().weight)
    assert head.weight.shape == (49152, 576) and head.weight.dtype == dtype
    assert -6 < ref[valid].mean().item() < -0.5, "a real model predicts its own chat text far better than uniform"

    errors = {}
    with torch.no_grad():
        lp = linear_logprobs(hidden, head, targets, impl="torch")
        errors["logprobs torch"] = (lp.double() - ref)[valid].abs().max().item()

        # the policy loss (TRRD, alpha 0.5, clamp 1): old and teacher log-probs near the model's, so
        # ratios straddle the clip range and the teacher clamp
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(2, *targets.shape, generator=g, dtype=torch.float64)
        tok_in = TokenInputs(advantages=torch.randn(targets.shape, generator=g).to(dtype),
                             old_logp=(ref + 0.15 * noise[0]).clamp(max=0).to(dtype),
                             teacher_logp=(ref + 1.0 * noise[1]).clamp(max=0).to(dtype))
        cfg = PolicyLossConfig()
        res = linear_policy_loss(hidden, head, targets, tok_in, config=cfg, impl="torch")
        errors["policy logp torch"] = (res.logp.double() - ref)[valid].abs().max().item()
        ref_inputs = tok_in.map(lambda t: t.double()[valid])
        token_loss, _ = policy_token_loss(ref[valid], ref_inputs, cfg)
        expected = token_loss.mean().item()
        # |dL/dlp| <= |A| r per token (1 with the clip): the loss moves at most that much per unit of log-prob
        ratio = torch.exp(0.5 * (ref[valid] - ref_inputs.old_logp)
                          + 0.5 * (ref[valid] - ref_inputs.teacher_logp).clamp(-1, 1))
        loss_tol = tol * (ref_inputs.advantages.abs() * ratio).max().item() * 1.01
        assert abs(res.loss.item() - expected) <= loss_tol, (res.loss.item(), expected, loss_tol)
        errors["policy loss torch"] = abs(res.loss.item() - expected)

        # the Triton kernels in the interpreter, on a slice of tokens (large tiles: fewer interpreted steps)
        rows, cols = valid.nonzero()[-TRITON_TOKENS:].unbind(1)
        with triton_config(block_n=16, block_v=4096, block_h=64, split_v=1):
            lp_t = linear_logprobs(hidden[rows, cols], head, targets[rows, cols], impl="triton")
            res_t = linear_policy_loss(hidden[rows, cols], head, targets[rows, cols],
                                       tok_in.map(lambda t: t[rows, cols]), config=cfg, impl="triton")
        errors["logprobs triton"] = (lp_t.double() - ref[rows, cols]).abs().max().item()
        errors["policy logp triton"] = (res_t.logp.double() - ref[rows, cols]).abs().max().item()
    print(f"\n{dtype}: max|z| {zmax:.2f}, tol {tol:.3g}; max |error|: "
          + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    for what, err in errors.items():
        if what != "policy loss torch":
            assert err <= tol, f"{what}: max |error| {err:.3g} > {tol:.3g} ({dtype}, max|z| {zmax:.1f})"
