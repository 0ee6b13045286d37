"""linear_divergence: every implementation vs the float64 materialized reference, the reference
vs ``torch.nn.functional.kl_div``, JSD endpoints and symmetry, KL(p || p) = 0, error paths."""

import pytest
import torch
import torch.nn.functional as F

from rlad_kernels import linear_divergence, triton_config

from helpers import DTYPES, TOL, assert_rel, kw_id

KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.15), ("jsd", 0.9)]
# two logit tiles (student and teacher) per element: twice the float32 rounding of one
GRAD_TOL = {torch.float32: 2 * TOL[torch.float32]["grad"], torch.bfloat16: TOL[torch.bfloat16]["grad"]}


def make_pair(N=29, Hs=21, Ht=35, V=133, Vt=140, dtype=torch.float32, seed=0, device="cpu", lead=None):
    """Student and teacher with different hidden sizes; the teacher vocabulary is padded (Vt > V)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead else (N,)
    t = dict(dtype=dtype, device=device)
    hs = torch.randn(*shape, Hs, generator=g).to(**t)
    ws = (torch.randn(V, Hs, generator=g) * (2.0 / Hs ** 0.5)).to(**t)
    bs = (torch.randn(V, generator=g) * 0.5).to(**t)
    ht = torch.randn(*shape, Ht, generator=g).to(**t)
    wt = (torch.randn(Vt, Ht, generator=g) * (2.0 / Ht ** 0.5)).to(**t)
    bt = (torch.randn(Vt, generator=g) * 0.5).to(**t)
    mask = (torch.rand(shape, generator=g) > 0.2).to(device)
    return hs, ws, bs, ht, wt, bt, mask


def _run(impl, pair, kind, beta, g, **kw):
    hs, ws, bs, ht, wt, bt, mask = pair
    leaves = [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]
    D = linear_divergence(leaves[0], leaves[1], ht, wt, kind=kind, beta=beta, student_bias=leaves[2],
                          teacher_bias=bt, mask=mask, reduction="none", impl=impl, **kw)
    (D * g).sum().backward()
    return [D.detach()] + [x.grad for x in leaves]


def _ref(pair, kind, beta, g, **kw):
    return _run("naive", [x.double() if x.is_floating_point() else x for x in pair], kind, beta, g.double(), **kw)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_float64_reference(impl, kind, beta, dtype, small_chunks, device):
    pair = make_pair(dtype=dtype, device=device, seed=KINDS.index((kind, beta)))
    g = torch.randn(pair[0].shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    out = _run(impl, pair, kind, beta, g, temperature=0.8)
    ref = _ref(pair, kind, beta, g, temperature=0.8)
    mask = pair[-1]
    assert out[0].dtype == torch.float32
    assert torch.all(out[0][~mask] == 0) and torch.all(out[0][mask] > 0)
    for name, a, r in zip(["D", "d_hidden", "d_weight", "d_bias"], out, ref, strict=True):
        assert_rel(a, r, TOL[dtype]["fwd"] if name == "D" else GRAD_TOL[dtype], name)
    assert torch.all(out[1][~mask] == 0)


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_triton_splits_and_scratch_chunks(split, kind, beta, device):
    pair = make_pair(N=37, V=149, Vt=160, device=device, seed=3)
    g = torch.randn(37, generator=torch.Generator().manual_seed(2)).to(device)
    with triton_config(split_v=split, scratch_bytes=1):
        out = _run("triton", pair, kind, beta, g, temperature=1.3)
    ref = _ref(pair, kind, beta, g, temperature=1.3)
    for name, a, r in zip(["D", "d_hidden", "d_weight", "d_bias"], out, ref, strict=True):
        assert_rel(a, r, TOL[torch.float32]["fwd"] if name == "D" else GRAD_TOL[torch.float32], name)


def _logsoftmax(h, w, b, V, T):
    return torch.log_softmax((h @ w[:V].T + b[:V]) / T, -1)


def test_reference_matches_torch_kl_div():
    hs, ws, bs, ht, wt, bt, _ = [x.double() if x.is_floating_point() else x for x in make_pair(seed=5)]
    V, T = ws.shape[0], 0.7
    ls, lt = _logsoftmax(hs, ws, bs, V, T), _logsoftmax(ht, wt, bt, V, T)
    kw = dict(student_bias=bs, teacher_bias=bt, temperature=T, reduction="none", impl="naive")
    rkl = linear_divergence(hs, ws, ht, wt, kind="reverse_kl", **kw)
    fkl = linear_divergence(hs, ws, ht, wt, kind="forward_kl", **kw)
    # kl_div(input, target) = sum target * (log target - input)
    torch.testing.assert_close(rkl, F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(fkl, F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1))
    beta = 0.3
    m = (beta * lt.exp() + (1 - beta) * ls.exp()).log()
    jsd = beta * F.kl_div(m, lt, log_target=True, reduction="none").sum(-1) + \
        (1 - beta) * F.kl_div(m, ls, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(linear_divergence(hs, ws, ht, wt, kind="jsd", beta=beta, **kw), jsd)
    assert (rkl > 0).all() and (fkl > 0).all() and (jsd > 0).all()


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_jsd_endpoints_and_symmetry(impl, small_chunks, device):
    hs, ws, bs, ht, wt, bt, mask = make_pair(Hs=24, Ht=24, Vt=133, device=device, seed=7)
    kw = dict(student_bias=bs, teacher_bias=bt, reduction="none", impl=impl)
    fkl = linear_divergence(hs, ws, ht, wt, kind="forward_kl", **kw)
    rkl = linear_divergence(hs, ws, ht, wt, kind="reverse_kl", **kw)
    assert torch.equal(linear_divergence(hs, ws, ht, wt, kind="jsd", beta=0.0, **kw), fkl)
    assert torch.equal(linear_divergence(hs, ws, ht, wt, kind="jsd", beta=1.0, **kw), rkl)
    # JSD_0.5 is symmetric: swapping the roles of student and teacher gives the same value
    j = linear_divergence(hs, ws, ht, wt, kind="jsd", beta=0.5, **kw)
    swapped = linear_divergence(ht, wt, hs, ws, kind="jsd", beta=0.5, student_bias=bt, teacher_bias=bs,
                                reduction="none", impl=impl)
    torch.testing.assert_close(j, swapped, rtol=1e-5, atol=1e-7)
    # and bounded by log 2
    assert (j <= torch.log(torch.tensor(2.0)) + 1e-6).all()


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero(impl, kind, beta, small_chunks, device):
    hs, ws, bs, _, _, _, _ = make_pair(device=device, seed=9)
    h = hs.clone().requires_grad_()
    w = ws.clone().requires_grad_()
    D = linear_divergence(h, w, hs, ws, kind=kind, beta=beta, student_bias=bs, teacher_bias=bs, reduction="none",
                          impl=impl)
    D.sum().backward()
    assert D.abs().max() < 2e-6
    assert h.grad.abs().max() < 2e-6 and w.grad.abs().max() < 2e-6


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_reductions(impl, small_chunks, device):
    hs, ws, bs, ht, wt, bt, mask = make_pair(lead=(3, 7), device=device, seed=11)
    w = torch.rand(3, 7, generator=torch.Generator().manual_seed(3)).to(device)
    kw = dict(student_bias=bs, teacher_bias=bt, mask=mask, impl=impl)
    per = linear_divergence(hs, ws, ht, wt, reduction="none", **kw)
    assert per.shape == (3, 7)
    s = linear_divergence(hs, ws, ht, wt, reduction="sum", token_weights=w, **kw)
    m = linear_divergence(hs, ws, ht, wt, reduction="mean", token_weights=w, **kw)
    n = linear_divergence(hs, ws, ht, wt, reduction="mean", token_weights=w, normalizer=4.0, **kw)
    torch.testing.assert_close(s, (per * w)[mask].sum())
    torch.testing.assert_close(m, (per * w)[mask].sum() / w[mask].sum())
    torch.testing.assert_close(n, (per * w)[mask].sum() / 4.0)
    empty = linear_divergence(hs, ws, ht, wt, reduction="mean", mask=torch.zeros_like(mask), impl=impl)
    assert empty.item() == 0.0


# ---------------------------------------------------------------- errors
@pytest.fixture
def pair(device):
    return make_pair(device=device)


def test_token_shape_mismatch(pair):
    hs, ws, _, ht, wt, _, _ = pair
    with pytest.raises(ValueError, match=r"teacher_hidden has token shape \(28,\) but student_hidden has \(29,\)"):
        linear_divergence(hs, ws, ht[:-1], wt)


def test_teacher_vocab_too_small(pair):
    hs, ws, _, ht, wt, _, _ = pair
    with pytest.raises(ValueError, match=r"teacher vocabulary \(100\) is smaller than the student's \(133\)"):
        linear_divergence(hs, ws, ht, wt[:100])


def test_teacher_hidden_size_mismatch(pair):
    hs, ws, _, ht, wt, _, _ = pair
    with pytest.raises(ValueError, match="teacher_weight has hidden size 34 but teacher_hidden has 35"):
        linear_divergence(hs, ws, ht, wt[:, :-1])


@pytest.mark.parametrize("which", ["teacher_hidden", "teacher_weight", "teacher_bias"])
def test_teacher_requiring_grad(pair, which):
    hs, ws, bs, ht, wt, bt, _ = pair
    t = dict(teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt)
    t[which] = t[which].clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"{which} requires grad, but the teacher is frozen"):
        linear_divergence(hs, ws, t["teacher_hidden"], t["teacher_weight"], teacher_bias=t["teacher_bias"])


@pytest.mark.parametrize("kw,err,msg", [
    (dict(beta=1.5), ValueError, "beta must be <= 1.0"),
    (dict(beta=-0.5), ValueError, "beta must be >= 0.0"),
    (dict(kind="tvd"), ValueError, "unknown kind 'tvd'"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(reduction="max"), ValueError, "unknown reduction 'max'"),
    (dict(impl="cuda"), ValueError, "unknown impl 'cuda'"),
], ids=kw_id)
def test_bad_options(pair, kw, err, msg):
    hs, ws, _, ht, wt, _, _ = pair
    with pytest.raises(err, match=msg):
        linear_divergence(hs, ws, ht, wt, **kw)


def test_bad_mask(pair):
    hs, ws, _, ht, wt, _, mask = pair
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        linear_divergence(hs, ws, ht, wt, mask=mask.float())
    with pytest.raises(ValueError, match=r"mask has shape \(28,\)"):
        linear_divergence(hs, ws, ht, wt, mask=mask[:-1])


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_nan_in_student_or_teacher_is_not_hidden(pair, impl):
    hs, ws, bs, ht, wt, bt, mask = pair
    i = mask.nonzero()[0].item()
    for which in ("student", "teacher"):
        h_s, h_t = hs.clone(), ht.clone()
        (h_s if which == "student" else h_t)[i, 0] = float("nan")
        D = linear_divergence(h_s, ws, h_t, wt, mask=mask, reduction="none", impl=impl)
        assert torch.isnan(D[i]), which
        assert torch.isnan(linear_divergence(h_s, ws, h_t, wt, mask=mask, impl=impl)), which
