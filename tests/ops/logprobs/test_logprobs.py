"""linear_logprobs: every implementation vs the float64 materialized-logits reference.

Forward values and all gradients (hidden, weight, bias) with a random upstream gradient on both
outputs, at odd shapes (N=1, N and V not multiples of any block, odd H), with ignored tokens,
temperature and logit_scale != 1, bias on/off, float32 and bfloat16 inputs. The Triton kernels
run in Triton's CPU interpreter here (TRITON_INTERPRET=1) and on the GPU when one is present.
"""

import pytest
import torch

from rlad_kernels import linear_logprobs, triton_config

from helpers import DTYPES, TOL, assert_rel, make_lm_inputs

SHAPES = [pytest.param(s, id="N{}-H{}-V{}".format(*s)) for s in [(1, 17, 37), (37, 45, 203), (70, 33, 129)]]


def _run(impl, hidden, weight, bias, targets, g_lp, g_ent, **kw):
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    lp, ent = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None,
                              return_entropy=True, impl=impl, **kw)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return [lp.detach(), ent.detach()] + [t.grad for t in leaves]


def _reference(hidden, weight, bias, targets, g_lp, g_ent, **kw):
    b64 = bias.double() if bias is not None else None
    return _run("naive", hidden.double(), weight.double(), b64, targets, g_lp.double(), g_ent.double(), **kw)


def _check(out, ref, dtype, bias):
    names = ["logp", "entropy", "d_hidden", "d_weight"] + (["d_bias"] if bias else [])
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    for name, a, r in zip(names, out, ref, strict=True):
        tol = TOL[dtype]["fwd" if name in ("logp", "entropy") else "grad"]
        assert_rel(a, r, tol, name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
def test_matches_float64_reference(impl, shape, dtype, bias, small_chunks, device):
    N, H, V = shape
    hidden, weight, b, targets = make_lm_inputs(N, H, V, dtype=dtype, bias=bias, seed=N + V)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    kw = dict(temperature=0.7, logit_scale=1.3)
    out = _run(impl, hidden, weight, b, targets, g_lp, g_ent, **kw)
    ref = _reference(hidden, weight, b, targets, g_lp, g_ent, **kw)
    _check(out, ref, dtype, bias)


@pytest.mark.parametrize("split", [1, 2, 5])
@pytest.mark.parametrize("scratch_bytes", [1, 64 << 20])
def test_triton_vocab_splits_and_backward_chunks(split, scratch_bytes, device):
    """The split-vocabulary forward (combine launch) and a scratch budget so small that every
    backward pass runs one tile-row / tile-column chunk at a time give the same answer."""
    N, H, V = 45, 29, 211
    hidden, weight, b, targets = make_lm_inputs(N, H, V, bias=True, seed=3)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    with triton_config(split_v=split, scratch_bytes=scratch_bytes):
        out = _run("triton", hidden, weight, b, targets, g_lp, g_ent, temperature=1.4)
    ref = _reference(hidden, weight, b, targets, g_lp, g_ent, temperature=1.4)
    _check(out, ref, torch.float32, True)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_leading_dims_and_ignored_rows(impl, small_chunks, device):
    """[B, T] inputs keep their shape; ignored positions give 0 and get exactly zero gradient."""
    B, T, H, V = 3, 11, 21, 97
    hidden, weight, _, targets = make_lm_inputs(B * T, H, V, lead=(B, T), ignore_frac=0.3, seed=5)
    hidden.requires_grad_()
    lp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    assert lp.shape == (B, T) and ent.shape == (B, T)
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(lp[~ignored] < 0) and torch.all(ent[~ignored] > 0)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad[ignored] == 0)
    assert hidden.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logprob_only_and_entropy_only_gradients(impl, small_chunks, device):
    """Backward with only one of the outputs used (the other's gradient is None)."""
    N, H, V = 19, 24, 77
    hidden, weight, _, targets = make_lm_inputs(N, H, V, seed=7)
    for which in ("logp", "entropy"):
        h = hidden.clone().requires_grad_()
        h64 = hidden.double().requires_grad_()
        out = linear_logprobs(h, weight, targets, return_entropy=True, impl=impl)
        ref = linear_logprobs(h64, weight.double(), targets, return_entropy=True, impl="naive")
        pick = 0 if which == "logp" else 1
        out[pick].sum().backward()
        ref[pick].sum().backward()
        assert_rel(h.grad, h64.grad, 2e-5, f"d_hidden via {which}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_entropy_requested(impl, small_chunks, device):
    N, H, V = 13, 16, 64
    hidden, weight, b, targets = make_lm_inputs(N, H, V, bias=True, seed=11)
    w = weight.clone().requires_grad_()
    lp = linear_logprobs(hidden, w, targets, bias=b, impl=impl)
    w64 = weight.double().requires_grad_()
    ref = linear_logprobs(hidden.double(), w64, targets, bias=b.double(), impl="naive")
    assert_rel(lp, ref, 2e-5, "logp")
    lp.sum().backward()
    ref.sum().backward()
    assert_rel(w.grad, w64.grad, 2e-5, "d_weight")


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
def test_logprobs_normalize(impl, small_chunks, device):
    """Independent property: summing exp(logp) over every possible target gives 1."""
    N, H, V = 5, 12, 41
    hidden, weight, _, _ = make_lm_inputs(N, H, V, ignore_frac=0.0, seed=13)
    all_targets = torch.arange(V, device=hidden.device).repeat(N, 1)
    lp = linear_logprobs(hidden[:, None, :].expand(N, V, H), weight, all_targets, impl=impl)
    torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(N, dtype=torch.float64, device=lp.device), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_minus_inf_bias_columns(impl, small_chunks, device):
    """Columns masked with a -inf bias get probability 0 and do not poison lse or entropy."""
    N, H, V = 9, 16, 70
    hidden, weight, b, targets = make_lm_inputs(N, H, V, bias=True, ignore_frac=0.0, seed=17)
    b = b.clone()
    b[::3] = float("-inf")
    targets = torch.where(targets % 3 == 0, targets + 1, targets).clamp_max(V - 1)
    targets[targets % 3 == 0] = 1
    lp, ent = linear_logprobs(hidden, weight, targets, bias=b, return_entropy=True, impl=impl)
    keep = torch.isfinite(b)
    ref_lp, ref_ent = linear_logprobs(hidden.double(), weight[keep].double(),
                                      torch.cumsum(keep.long(), 0)[targets] - 1,
                                      bias=b[keep].double(), return_entropy=True, impl="naive")
    assert_rel(lp, ref_lp, 2e-5, "logp")
    assert_rel(ent, ref_ent, 2e-5, "entropy")
