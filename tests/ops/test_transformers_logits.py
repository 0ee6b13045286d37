"""Log-probs from hidden states match ``transformers``' own logits.

Tiny random-init causal LMs are built from configs (no download). The decoder's final hidden
states and ``get_output_embeddings().weight`` go through ``linear_logprobs``; the reference is
``log_softmax(model(...).logits / temperature)`` gathered at the next tokens, computed by the
model's own forward.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlad_kernels import linear_logprobs  # noqa: E402

from helpers import tiny_lm_config  # noqa: E402

V = 131



@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("impl", ["triton", "torch", "naive"])
def test_logprobs_match_model_logits(family, tie, impl, device):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_lm_config(family, V, tie)).to(device).eval()
    # random init gives near-uniform logits; sharpen the head so the test sees peaked distributions
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    ids = torch.randint(0, V, (3, 17), device=device)
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # left padding on one row
    temperature = 0.7
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # after the final norm: what lm_head consumes
        ref = torch.log_softmax(out.logits.double()[:, :-1] / temperature, dim=-1)
        targets = ids[:, 1:].clone()
        targets[attn[:, 1:] == 0] = -100
        ref = ref.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ref = torch.where(targets == -100, torch.zeros_like(ref), ref)
        weight = model.get_output_embeddings().weight
        softcap = getattr(model.config, "final_logit_softcapping", None)
        lp = linear_logprobs(hidden[:, :-1], weight, targets, temperature=temperature, softcap=softcap, impl=impl)
    assert lp.shape == targets.shape
    assert (ref[targets != -100] < -1e-3).all()
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=2e-5)
    if tie:
        assert weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_gradients_flow_to_the_model(device):
    """Training through the fused op reaches the decoder's parameters and the head."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_lm_config("qwen2", V, True)).to(device)
    ids = torch.randint(0, V, (2, 9), device=device)
    hidden = model.model(input_ids=ids).last_hidden_state
    lp = linear_logprobs(hidden[:, :-1], model.get_output_embeddings().weight, ids[:, 1:])
    (-lp.mean()).backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
