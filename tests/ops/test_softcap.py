"""Soft-capped logits (Gemma 2/3's ``final_logit_softcapping``): ``z = c tanh(raw * logit_scale / c) / T``.

Every op and implementation against the float64 materialized reference: outputs and every
gradient (the cap's slope ``1 - tanh^2`` enters them all). The cap is small against the logits
so it bends most of them, including past the point where ``tanh`` saturates. The reference
itself is checked against ``transformers``' Gemma 2 logits in ``test_transformers_logits.py``.
"""

import pytest
import torch

from rlad_kernels import PolicyLossConfig, linear_divergence, linear_logprobs, linear_policy_loss

from helpers import DTYPES, TOL, assert_rel, make_lm_inputs

N, H, V = 37, 24, 149
CAP = 3.0


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _f64(*ts):
    return [t.double() if t is not None and t.is_floating_point() else t for t in ts]


def test_the_cap_bends_the_logits():
    """Guards the tests below against a cap that never acts: many logits sit in tanh's curved
    part and some beyond 2c (where it saturates)."""
    hidden, weight, b, _ = make_lm_inputs(N, H, V, bias=True, seed=1, peaked=6.0, device="cpu")
    raw = (hidden @ weight.T + b) * 1.3
    assert (raw.abs() > CAP).float().mean() > 0.2 and (raw.abs() > 2 * CAP).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logprobs_and_entropy(impl, dtype, small_chunks, device):
    hidden, weight, b, targets = make_lm_inputs(N, H, V, dtype=dtype, bias=True, seed=1, peaked=6.0)
    g = torch.Generator().manual_seed(2)
    g1, g2 = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    kw = dict(temperature=0.7, logit_scale=1.3, softcap=CAP, return_entropy=True)

    def run(impl_, h, w, bb, a, c):
        h, w, bb = _leaves(h, w, bb)
        lp, ent = linear_logprobs(h, w, targets, bias=bb, impl=impl_, **kw)
        ((lp * a).sum() + (ent * c).sum()).backward()
        return [lp.detach(), ent.detach(), h.grad, w.grad, bb.grad]

    out = run(impl, hidden, weight, b, g1, g2)
    ref = run("naive", *_f64(hidden, weight, b, g1, g2))
    for name, a, r in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), out, ref, strict=True):
        assert_rel(a, r, TOL[dtype]["fwd" if name in ("logp", "entropy") else "grad"], name)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_policy_loss_with_both_caps(impl, small_chunks, device):
    """TRRD with the student's cap and logit scale, plus the exact-KL KD term whose teacher has its
    own cap and scale."""
    hidden, weight, b, targets = make_lm_inputs(N, H, V, bias=True, seed=3, peaked=6.0)
    ht, wt, bt, _ = make_lm_inputs(N, H + 8, V + 5, bias=True, seed=4, peaked=6.0)
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(N, generator=g).to(device)
    with torch.no_grad():
        lp = linear_logprobs(hidden.double(), weight.double(), targets, bias=b.double(), softcap=CAP, logit_scale=1.3,
                             impl="naive")
    old = (lp + 0.3 * torch.randn(N, generator=g).to(device).double()).float()
    cfg = PolicyLossConfig(alpha=0.5, kd_estimator="full", kd_coef=0.2, entropy_coef=0.01)

    def run(impl_, h, w, bb, ht_, wt_, bt_, a, o):
        h, w, bb = _leaves(h, w, bb)
        out = linear_policy_loss(h, w, targets, a, o, bias=bb, teacher_hidden=ht_, teacher_weight=wt_,
                                 teacher_bias=bt_, softcap=CAP, teacher_softcap=2 * CAP, logit_scale=1.3,
                                 teacher_logit_scale=0.8, config=cfg, impl=impl_)
        out.loss.backward()
        return out, [out.loss.detach(), h.grad, w.grad, bb.grad]

    out, got = run(impl, hidden, weight, b, ht, wt, bt, adv, old)
    ref, want = run("naive", *_f64(hidden, weight, b, ht, wt, bt, adv, old))
    for name, a, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want, strict=True):
        assert_rel(a, r, 1e-5 if name == "loss" else 1e-4, name)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].double().cpu(), ref.metrics[k].double().cpu(), rtol=1e-5,
                                   atol=1e-6, msg=f"metric {k}")
    assert 0 < ref.metrics["clip_frac"] < 1 and ref.metrics["kd_mean"] > 0


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_divergence_with_both_caps_and_scales(impl, kind, beta, small_chunks, device):
    hs, ws, bs, _ = make_lm_inputs(N, H, V, bias=True, seed=6, peaked=6.0)
    ht, wt, bt, _ = make_lm_inputs(N, H + 8, V, bias=True, seed=7, peaked=6.0)
    gd = torch.randn(N, generator=torch.Generator().manual_seed(8)).to(device)

    def run(impl_, h, w, bb, ht_, wt_, bt_, g):
        h, w, bb = _leaves(h, w, bb)
        d = linear_divergence(h, w, ht_, wt_, student_bias=bb, teacher_bias=bt_, student_softcap=CAP,
                              teacher_softcap=1.5 * CAP, student_logit_scale=1.3, teacher_logit_scale=0.9, kind=kind,
                              beta=beta, temperature=0.8, reduction="none", impl=impl_)
        (d * g).sum().backward()
        return [d.detach(), h.grad, w.grad, bb.grad]

    got = run(impl, hs, ws, bs, ht, wt, bt, gd)
    want = run("naive", *_f64(hs, ws, bs, ht, wt, bt, gd))
    for name, a, r in zip(("D", "d_hidden", "d_weight", "d_bias"), got, want, strict=True):
        assert_rel(a, r, TOL[torch.float32]["fwd"] if name == "D" else 2 * TOL[torch.float32]["grad"], name)


def test_bad_softcap(device):
    hidden, weight, _, targets = make_lm_inputs(N, H, V, seed=9)
    for value, err in ((0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("30", TypeError)):
        with pytest.raises(err, match="softcap"):
            linear_logprobs(hidden, weight, targets, softcap=value)
    with pytest.raises(ValueError, match="teacher_softcap must be > 0"):
        linear_divergence(hidden, weight, hidden, weight, teacher_softcap=0.0)
