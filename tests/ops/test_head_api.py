"""The public API's shape: every op takes the lm_head as one ``LMHead`` (the student's and the
teacher's alike) and the policy loss its per-token inputs as one ``TokenInputs``; the keyword
form of earlier releases gives the same numbers, with a ``DeprecationWarning``, for one release;
no public function takes more than 14 named parameters."""

import inspect
import warnings

import pytest
import torch

import rlad_kernels
from rlad_kernels import (
    LinearDivergence,
    LinearLogprobs,
    LinearPolicyLoss,
    LMHead,
    PolicyLossConfig,
    TokenInputs,
    linear_divergence,
    linear_logprobs,
    linear_policy_loss,
)

N, H, HT, V = 10, 12, 9, 30


def _tensors(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(h=r(N, H), w=r(V, H) * 0.3, b=r(V) * 0.1, ht=r(N, HT), wt=r(V + 4, HT) * 0.3, bt=r(V + 4) * 0.1,
                t=torch.randint(0, V, (N,), generator=g), a=r(N), old=-r(N).abs(), tl=-r(N).abs())


def _new_only(fn):
    """``fn()`` under warnings-as-errors: the current form must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def _old(fn):
    with pytest.warns(DeprecationWarning, match=r"deprecated and will be removed in the next release.*LMHead|"
                                                 r"deprecated and will be removed in the next release.*TokenInputs"):
        return fn()


def test_logprobs_old_form_equals_the_head_form():
    x = _tensors()
    head = LMHead(x["w"], x["b"], logit_scale=0.7, softcap=3.0)
    new = _new_only(lambda: linear_logprobs(x["h"], head, x["t"], temperature=0.9, return_entropy=True, impl="torch"))
    old = _old(lambda: linear_logprobs(x["h"], x["w"], x["t"], bias=x["b"], logit_scale=0.7, softcap=3.0,
                                       temperature=0.9, return_entropy=True, impl="torch"))
    assert all(torch.equal(n, o) for n, o in zip(new, old, strict=True))
    # the head's fields are the ones used: a different cap changes the result
    capped = linear_logprobs(x["h"], LMHead(x["w"], x["b"], logit_scale=0.7, softcap=1.0), x["t"], temperature=0.9,
                             impl="torch")
    assert not torch.allclose(capped, new[0])


def test_divergence_old_form_equals_the_head_form():
    x = _tensors()
    hs, ht = LMHead(x["w"], x["b"], 1.3, None), LMHead(x["wt"], x["bt"], 0.8, 5.0)
    new = _new_only(lambda: linear_divergence(x["h"], hs, x["ht"], ht, kind="jsd", beta=0.3, reduction="none",
                                              impl="torch"))
    old = _old(lambda: linear_divergence(x["h"], x["w"], x["ht"], x["wt"], kind="jsd", beta=0.3, reduction="none",
                                         impl="torch", student_bias=x["b"], teacher_bias=x["bt"],
                                         student_logit_scale=1.3, teacher_logit_scale=0.8, teacher_softcap=5.0))
    assert torch.equal(new, old)
    mod = LinearDivergence("jsd", beta=0.3, reduction="none", impl="torch")
    assert torch.equal(_new_only(lambda: mod(x["h"], hs, x["ht"], ht)), new)


@pytest.mark.parametrize("kd", [None, "full"])
def test_policy_loss_old_form_equals_the_typed_form(kd):
    x = _tensors()
    cfg = PolicyLossConfig(alpha=0.5 if kd is None else 1.0, kd_estimator=kd, kd_coef=0.2)
    head, teacher = LMHead(x["w"], x["b"], softcap=4.0), LMHead(x["wt"], x["bt"], logit_scale=1.1)
    inputs = TokenInputs(advantages=x["a"], old_logp=x["old"], teacher_logp=x["tl"] if kd is None else None)
    new = _new_only(lambda: linear_policy_loss(x["h"], head, x["t"], inputs, teacher_hidden=x["ht"],
                                               teacher_head=teacher, temperature=0.8, config=cfg, impl="torch"))
    old = _old(lambda: linear_policy_loss(x["h"], x["w"], x["t"], x["a"], x["old"], bias=x["b"], softcap=4.0,
                                          teacher_logp=inputs.teacher_logp, teacher_hidden=x["ht"],
                                          teacher_weight=x["wt"], teacher_bias=x["bt"], teacher_logit_scale=1.1,
                                          temperature=0.8, config=cfg, impl="torch"))
    assert torch.equal(new.loss, old.loss) and torch.equal(new.logp, old.logp)
    assert new.metrics.keys() == old.metrics.keys()
    mod = LinearPolicyLoss(cfg, temperature=0.8, impl="torch")
    by_module = _new_only(lambda: mod(x["h"], head, x["t"], inputs, teacher_hidden=x["ht"], teacher_head=teacher))
    assert torch.equal(by_module.loss, new.loss)


def test_the_modules_old_settings_apply_to_bare_weights_only():
    x = _tensors()
    with pytest.warns(DeprecationWarning, match=r"LinearLogprobs\(softcap=...\) is deprecated"):
        mod = LinearLogprobs(softcap=3.0, impl="torch")
    with pytest.warns(DeprecationWarning):
        old = mod(x["h"], x["w"], x["t"], bias=x["b"])
    assert torch.equal(old, linear_logprobs(x["h"], LMHead(x["w"], x["b"], softcap=3.0), x["t"], impl="torch"))
    with pytest.raises(TypeError, match="LinearLogprobs was built with softcap but forward got an LMHead"):
        mod(x["h"], LMHead(x["w"]), x["t"])


def test_mixed_or_wrong_forms_are_refused():
    x = _tensors()
    head = LMHead(x["w"])
    with pytest.raises(TypeError, match=r"linear_logprobs: softcap belong in the LMHead \(head=LMHead\(weight, "
                                        r"softcap=...\)\), not beside it"):
        linear_logprobs(x["h"], head, x["t"], softcap=2.0)
    with pytest.raises(TypeError, match=r"head must be an LMHead \(rlad_kernels.LMHead\(weight, bias=None, "
                                        r"logit_scale=1.0, softcap=None\)\), got ndarray"):
        linear_logprobs(x["h"], x["w"].numpy(), x["t"])
    with pytest.raises(TypeError, match=r"got unexpected keyword argument\(s\) 'logits_scale'"):
        linear_logprobs(x["h"], head, x["t"], logits_scale=2.0)
    inputs = TokenInputs(advantages=x["a"], old_logp=x["old"])
    with pytest.raises(TypeError, match="the per-token inputs go in the TokenInputs only; got ref_logp beside it"):
        linear_policy_loss(x["h"], head, x["t"], inputs, ref_logp=x["tl"])
    with pytest.raises(TypeError, match="teacher_weight is the old form of teacher_head; pass one of them"):
        linear_policy_loss(x["h"], head, x["t"], inputs, teacher_hidden=x["ht"], teacher_head=LMHead(x["wt"]),
                           teacher_weight=x["wt"])
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="missing the per-token input"):
        linear_policy_loss(x["h"], head, x["t"], x["a"])


def test_lm_head_of_a_transformers_model_reads_its_logit_map():
    from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    head = LMHead.of(llama)
    assert head.weight is llama.lm_head.weight and head.bias is None
    assert (head.logit_scale, head.softcap) == (1.0, None)
    cohere = LMHead.of(CohereForCausalLM(CohereConfig(**small, logit_scale=0.25)))
    assert cohere.logit_scale == 0.25
    llama.config.final_logit_softcapping = 30.0  # Gemma 2/3's key, read the same way on any config
    assert LMHead.of(llama).softcap == 30.0


def test_no_public_function_takes_more_than_14_parameters():
    """Named parameters of every public function and module (the old form's ``*args`` /
    ``**kwargs`` are not parameters of the current API; configs and records are not calls)."""
    wide = {}
    for name in rlad_kernels.__all__:
        obj = getattr(rlad_kernels, name)
        if inspect.isclass(obj) and not issubclass(obj, torch.nn.Module) or not callable(obj):
            continue
        fn = obj.__init__ if inspect.isclass(obj) else obj
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
        if len(params) > 14:
            wide[name] = len(params)
    assert wide == {}
    forward = [len(inspect.signature(m.forward).parameters) for m in (LinearLogprobs, LinearPolicyLoss,
                                                                      LinearDivergence)]
    assert max(forward) <= 14
