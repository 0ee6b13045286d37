"""``apply_rlad_kernels``: a patched causal LM's forward returns the log-probs (and entropies) of
given labels through the fused op, equal to those of the unpatched model's own logits, with the
same gradients w.r.t. the model's parameters.

Tiny random-init models (``helpers.tiny_lm_config``, no download) of the Llama, Qwen2, Qwen3 and
Gemma 1/2/3 families (Gemma 2/3 soft-cap their final logits), and Cohere / Granite for the
logit scale. The reference is ``log_softmax(model(...).logits / T)`` of the unpatched forward,
gathered at ``labels[:, 1:]``.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlad_kernels import apply_rlad_kernels, remove_rlad_kernels  # noqa: E402

from helpers import TOL, assert_rel, tiny_lm_config  # noqa: E402

V = 131
T = 0.7
FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]
# float64 runs the same math with ~1e-16 rounding: the bounds are float32's scaled down
TOL64 = dict(fwd=1e-12, grad=1e-11)


def _model(family, tie, dtype, device=None, config=None):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config or tiny_lm_config(family, V, tie))
    model = model.to(device or "cpu", dtype).eval()
    with torch.no_grad():  # random init gives near-uniform logits; a sharper head makes the map (cap, scale) matter
        model.get_output_embeddings().weight.mul_(8.0)
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.normal_()
    return model


def _batch(device=None, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 13), generator=g)
    attn = torch.ones_like(ids)
    if pad:
        attn[1, :4] = 0  # left padding on one row
    labels = ids.clone()
    labels[attn == 0] = -100
    labels[2, :6] = -100  # a prompt that is not scored
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), attn.to(device), pos.to(device), labels.to(device)


def _reference(logits, labels, temperature):
    """log-probs and entropies [B, L-1] of labels[:, 1:] under log_softmax(logits[:, :-1] / T), 0 at -100."""
    logq = torch.log_softmax(logits[:, :-1].double() / temperature, -1)
    tgt = labels[:, 1:]
    lp = logq.gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    ent = -(logq.exp() * logq).sum(-1)
    keep = tgt != -100
    return torch.where(keep, lp, 0), ent, keep


def _tol(dtype):
    return TOL64 if dtype == torch.float64 else TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_and_grads_match_the_unpatched_model(family, dtype):
    tie = family in ("qwen2", "gemma", "gemma2", "gemma3")  # as those families ship; llama and qwen3 untied
    model = _model(family, tie, dtype)
    # transformers' eager Gemma 2/3 attention (soft-capped scores) gives NaN on a left-padded row in float64:
    # that row's logits are NaN, unpatched too, so float64 Gemma 2/3 run without padding
    ids, attn, pos, labels = _batch(pad=not (family in ("gemma2", "gemma3") and dtype == torch.float64))
    ref_out = model(ids, attention_mask=attn, position_ids=pos)
    ref_lp, ref_ent, keep = _reference(ref_out.logits, labels, T)
    assert (ref_lp[keep] < -1e-3).all()
    ref_loss = -(ref_lp[keep].sum() + 0.1 * ref_ent[keep].sum())
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    assert apply_rlad_kernels(model, impl="torch") is model
    out = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels, temperature=T, return_entropy=True)
    assert out.logits is None and out.logprobs.shape == out.entropy.shape == (3, 12)
    assert out.logprobs.dtype == dtype
    tol = _tol(dtype)
    assert_rel(out.logprobs, ref_lp, tol["fwd"], "logprobs")
    assert (out.logprobs[~keep] == 0).all()
    assert_rel(out.entropy[keep], ref_ent[keep], tol["fwd"], "entropy")
    loss = -(out.logprobs[keep].sum() + 0.1 * out.entropy[keep].sum())
    loss.backward()
    head = model.get_output_embeddings().weight
    names = {id(p): n for n, p in model.named_parameters()}
    checked = {names[id(head)], names[id(model.get_input_embeddings().weight)],
               next(n for n in names.values() if "layers.0" in n and "q_proj.weight" in n),
               next(n for n in names.values() if "layers.1" in n and "down_proj.weight" in n),
               next(n for n in names.values() if n.endswith("norm.weight") and "layers" not in n)}
    assert len(checked) == (4 if tie else 5)
    for n in checked:
        assert ref_grads[n].abs().sum() > 0, n
        assert_rel(dict(model.named_parameters())[n].grad, ref_grads[n], tol["grad"], f"grad of {n}")


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_the_models_logit_scale_is_applied(family):
    """Cohere multiplies its logits by ``config.logit_scale``, Granite divides them by
    ``config.logits_scaling``; the patched forward follows (and a bias is carried)."""
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
    if family == "cohere":
        config = transformers.CohereConfig(logit_scale=0.25, **common)
    else:
        config = transformers.GraniteConfig(logits_scaling=4.0, **common)
    model = _model(family, None, torch.float64, config=config)
    ids, attn, pos, labels = _batch()
    with torch.no_grad():
        ref_lp, _, _ = _reference(model(ids, attention_mask=attn, position_ids=pos).logits, labels, 1.0)
        plain = model.get_output_embeddings()(model.get_decoder()(ids, attention_mask=attn,
                                                                  position_ids=pos).last_hidden_state)
        assert (_reference(plain, labels, 1.0)[0] - ref_lp).abs().max() > 1e-2  # the scale matters here
        apply_rlad_kernels(model)
        lp = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels).logprobs
    assert_rel(lp, ref_lp, TOL64["fwd"], "logprobs")


def test_triton_impl(device):
    """The default impl on CUDA (the Triton interpreter on CPU): float32, Gemma 2's soft cap."""
    model = _model("gemma2", True, torch.float32, device=device)
    ids, attn, pos, labels = _batch(device)
    ref_lp, ref_ent, keep = _reference(model(ids, attention_mask=attn, position_ids=pos).logits, labels, T)
    ref_lp.sum().backward()
    ref_grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    apply_rlad_kernels(model, impl="triton")
    out = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels, temperature=T, return_entropy=True)
    assert_rel(out.logprobs, ref_lp, TOL[torch.float32]["fwd"], "logprobs")
    assert_rel(out.entropy[keep], ref_ent[keep], TOL[torch.float32]["fwd"], "entropy")
    out.logprobs.sum().backward()
    assert_rel(model.get_output_embeddings().weight.grad, ref_grad, TOL[torch.float32]["grad"], "lm_head grad")


def test_unpatched_path_idempotence_and_remove():
    model = _model("llama", False, torch.float32)
    ids, attn, pos, labels = _batch()
    original_forward = model.forward
    with torch.no_grad():
        before = model(ids, attention_mask=attn, position_ids=pos, labels=labels)
        apply_rlad_kernels(model, impl="torch")
        apply_rlad_kernels(model, impl="naive")  # twice: one patch, the impl updated
        after = model(ids, attention_mask=attn, position_ids=pos, labels=labels)
        assert type(after) is type(before) and after.keys() == before.keys()
        for k in before.keys():
            if isinstance(before[k], torch.Tensor):
                assert torch.equal(after[k], before[k]), k
        lp = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels).logprobs
        torch.testing.assert_close(lp, _reference(before.logits, labels, 1.0)[0].float(), rtol=0, atol=1e-5)
        assert model.__dict__["_rlad_kernels_patch"]["impl"] == "naive"
        assert remove_rlad_kernels(model) is model
        assert "forward" not in model.__dict__ and model.forward == original_forward
        remove_rlad_kernels(model)  # a no-op now
        restored = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels)  # swallowed by **kwargs
        assert torch.equal(restored.logits, before.logits) and "logprobs" not in restored
    assert torch.equal(model(ids, attention_mask=attn, position_ids=pos).logits, before.logits)


def test_bad_inputs_are_refused():
    base = transformers.AutoModel.from_config(tiny_lm_config("llama", V, False))
    with pytest.raises(ValueError, match="LlamaModel has no output embeddings"):
        apply_rlad_kernels(base)
    with pytest.raises(ValueError, match="Linear is not a transformers model"):
        apply_rlad_kernels(torch.nn.Linear(2, 2))
    model = apply_rlad_kernels(_model("qwen2", True, torch.float32), impl="torch")
    ids, attn, pos, labels = _batch()
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM .*logprobs_of must be a tensor shaped like input_ids "
                                         r"\(3, 13\).*got \(3, 12\)"):
        model(ids, logprobs_of=labels[:, 1:])
    with pytest.raises(ValueError, match="labels= cannot be combined with logprobs_of="):
        model(ids, logprobs_of=labels, labels=labels)
    with pytest.raises(ValueError, match="logits_to_keep= cannot be combined"):
        model(ids, logprobs_of=labels, logits_to_keep=1)
    model(ids, logprobs_of=labels, logits_to_keep=0)  # transformers' default: all positions


def test_labels_to_keep_and_vocab_size():
    """``labels_to_keep=K`` scores the last K labels only ([B, K], the unpatched values' last K
    columns); ``vocab_size=Vc`` normalizes over the head's first Vc rows (a padded teacher head
    scoring a smaller student vocabulary)."""
    model = _model("llama", False, torch.float64)
    ids, attn, pos, labels = _batch()
    labels = labels.masked_fill(labels >= 100, 7)  # every label inside the cut vocabulary
    with torch.no_grad():
        logits = model(ids, attention_mask=attn, position_ids=pos).logits
    apply_rlad_kernels(model, impl="torch")
    K = 5
    out = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels, labels_to_keep=K, temperature=T,
                return_entropy=True)
    ref_lp, ref_ent, _ = _reference(logits, labels, T)
    assert out.logprobs.shape == out.entropy.shape == (3, K)
    assert_rel(out.logprobs, ref_lp[:, -K:], TOL64["fwd"], "logprobs")
    assert_rel(out.entropy, ref_ent[:, -K:], TOL64["fwd"], "entropy")
    cut = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels, vocab_size=100).logprobs
    assert_rel(cut, _reference(logits[..., :100], labels, 1.0)[0], TOL64["fwd"], "logprobs over 100 rows")
    assert (cut - _reference(logits, labels, 1.0)[0]).abs().max() > 1e-3  # the cut changes the normalizer


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_policy_loss_through_the_forward(alpha):
    """``policy_loss=`` returns the fused TRRD / GRPO loss from the forward: equal, with its gradients
    w.r.t. every parameter, to the formula written out here on the unpatched model's logits
    (float64): ``log r = a (lp - lp_old) + (1 - a) clamp(lp - lp_T, -1, 1)``,
    ``L = max(-A r, -A clip(r, 0.8, 1.2))``, token mean over the scored labels."""
    from rlad_kernels import PolicyLossConfig

    model = _model("qwen3", False, torch.float64)
    ids, attn, pos, labels = _batch()
    K = 8
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, K, dtype=torch.float64, generator=g)
    lp_old = -torch.rand(3, K, dtype=torch.float64, generator=g) * 6
    lp_t = -torch.rand(3, K, dtype=torch.float64, generator=g) * 6
    ref_lp, _, keep = _reference(model(ids, attention_mask=attn, position_ids=pos).logits, labels, T)
    lp, keep = ref_lp[:, -K:], keep[:, -K:]
    log_r = alpha * (lp - lp_old) + (1 - alpha) * torch.clamp(lp - lp_t, -1.0, 1.0)
    r = log_r.exp()
    L = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2))
    ref_loss = L[keep].sum() / keep.sum()
    assert ((r[keep] - 1).abs() > 0.2).any()  # some tokens are clipped
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    apply_rlad_kernels(model, impl="torch")
    cfg = PolicyLossConfig(alpha=alpha, teacher_clamp=1.0)
    out = model(ids, attention_mask=attn, position_ids=pos, logprobs_of=labels, labels_to_keep=K, temperature=T,
                policy_loss=dict(advantages=A, old_logp=lp_old, teacher_logp=lp_t, config=cfg))
    assert out.logits is None and set(out.metrics) >= {"clip_frac", "ratio_mean"}
    assert_rel(out.loss, ref_loss, TOL64["fwd"], "loss")
    assert_rel(out.logprobs[keep], lp[keep], TOL64["fwd"], "logprobs")
    out.loss.backward()
    for n, p in model.named_parameters():
        assert_rel(p.grad, ref_grads[n], TOL64["grad"], f"grad of {n}")


def test_bad_patch_options_are_refused():
    model = apply_rlad_kernels(_model("llama", False, torch.float32), impl="torch")
    ids, attn, pos, labels = _batch()
    for kw in (dict(labels_to_keep=2), dict(vocab_size=5), dict(policy_loss={})):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}= needs logprobs_of="):
            model(ids, **kw)
    for bad in (0, 13, 2.0, True):
        with pytest.raises(ValueError, match=r"labels_to_keep must be an int in \[1, 12\]"):
            model(ids, logprobs_of=labels, labels_to_keep=bad)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 131\]"):
        model(ids, logprobs_of=labels, vocab_size=132)
    with pytest.raises(TypeError, match="policy_loss must be a dict"):
        model(ids, logprobs_of=labels, policy_loss=[1])
    adv = torch.zeros(3, 12)
    with pytest.raises(ValueError, match="policy_loss must not set softcap, temperature"):
        model(ids, logprobs_of=labels, policy_loss=dict(advantages=adv, old_logp=adv, temperature=2.0, softcap=3.0))
    with pytest.raises(TypeError, match="advantages is required"):
        model(ids, logprobs_of=labels, policy_loss=dict(old_logp=adv))


def test_import_stays_light():
    """``import rlad_kernels`` imports neither transformers nor the trainer; the patch does on first use."""
    import subprocess
    import sys

    code = "import sys, rlad_kernels; print(sorted(m for m in ('transformers', 'rlad') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
