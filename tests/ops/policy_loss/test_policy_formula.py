"""``linear_policy_loss`` against an independent float64 reference of the documented per-token loss.

The reference below is written from the specification (``PolicyLossConfig`` docstring), not from
the library's code: logits, log-probs and entropy are recomputed here in float64 and the loss is
differentiated with autograd through those logits. Every loss variant is checked for the loss
value, the gradients (hidden, weight, bias) and the metrics, for impl naive / torch / triton.

Every library call runs on the ``device`` fixture's device (the Triton cases on the GPU when
there is one, in Triton's CPU interpreter otherwise); the reference stays on the CPU.

Tolerances: float64 impls 1e-10 relative (loss, gradients); triton (float32 inputs vs the float64
reference on the same float32 values) 1e-5 on the loss, 1e-4 on gradients (relative to the largest
reference entry); metrics are float32 scalars, checked to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from rlad_kernels import PolicyLossConfig

from helpers import leaves, ref_gate, ref_token_log_ratio, run_policy_loss
from helpers import rel_finite as rel

IMPLS = ["naive", "torch", "triton"]
IGNORE = -100
TEMP = 0.7


# ---------------------------------------------------------------------------- reference
def ref_lp_ent(hidden, weight, targets, bias=None, temperature=TEMP, logit_scale=1.0):
    """float64 log-prob of ``targets`` and entropy, from materialized logits (ignored rows: target 0)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp_all = torch.log_softmax(logits * logit_scale / temperature, dim=-1)
    idx = torch.where(targets != IGNORE, targets, torch.zeros_like(targets))
    lp = logp_all.gather(-1, idx[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent


def ref_token_loss(lp, ent, A, old, cfg, teacher=None, ref=None, kd_w=None):
    """Per-token L_t, ratio r_t and the KD / ref-KL values, straight from the specification."""
    log_r = ref_token_log_ratio(lp, A, old, teacher, cfg)
    r = torch.exp(log_r.clamp(max=20.0))
    L = torch.maximum(-A * r, -A * r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))
    if cfg.dual_clip is not None:
        L = torch.where(A < 0, torch.minimum(L, -cfg.dual_clip * A), L)
    extra = {}
    if cfg.ref_kl_coef != 0:
        x = (ref - lp).clamp(-20.0, 20.0)
        extra["ref_kl"] = x.exp() - x - 1
        L = L + cfg.ref_kl_coef * extra["ref_kl"]
    if cfg.kd_estimator is not None:
        R = teacher - lp
        if cfg.kd_estimator == "k1":
            kd = -R
        elif cfg.kd_estimator == "k2":
            kd = R * R / 2
        else:
            Rc = R.clamp(-20.0, 20.0)
            kd = Rc.exp() - Rc - 1
        extra["kd"] = kd
        L = L + cfg.kd_coef * (kd_w if kd_w is not None else 1.0) * kd
    L = L - cfg.entropy_coef * ent
    return L, r, extra


def ref_loss(lp, ent, valid, tok, cfg, normalizer=None):
    L, r, extra = ref_token_loss(lp, ent, tok["advantages"], tok["old_logp"], cfg, tok.get("teacher_logp"),
                                 tok.get("ref_logp"), tok.get("kd_weights"))
    w = tok.get("token_weights")
    w = w if w is not None else torch.ones_like(lp)
    total = torch.where(valid, w * L, torch.zeros_like(L)).sum()
    if normalizer is None:
        wsum = w[valid].sum()
        norm = wsum if wsum > 0 else 1.0
    else:
        norm = float(normalizer)
    extra["abs_loss"] = (torch.where(valid, w * L.abs(), torch.zeros_like(L)).sum() / norm).detach()
    return total / norm, r, extra


# ---------------------------------------------------------------------------- inputs
def make_case(seed, dtype, *, cap=False):
    """hidden, weight, bias, targets and per-token inputs exercising every branch (float64 tok)."""
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(23, 62, (1,), generator=g))
    H = int(torch.randint(17, 41, (1,), generator=g))
    V = int(torch.randint(50, 131, (1,), generator=g))
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:4]] = IGNORE
    lp, _ = ref_lp_ent(hidden, weight, targets, bias)
    lp = lp.detach()
    A = torch.randn(N, generator=g, dtype=torch.float64)
    A[::7] = 0.0
    A[1::9] = -2.5
    tok = dict(
        advantages=A,
        old_logp=lp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64),
        teacher_logp=lp + 1.5 * torch.randn(N, generator=g, dtype=torch.float64),
        ref_logp=lp + 0.4 * torch.randn(N, generator=g, dtype=torch.float64),
        kd_weights=(torch.rand(N, generator=g) < 0.6).double(),
        token_weights=torch.rand(N, generator=g, dtype=torch.float64) + 0.1,
    )
    if cap:  # log_r > 20 on a few tokens: A = 0 (0 * inf without the cap), A > 0, A < 0 (dual clip)
        valid_idx = (targets != IGNORE).nonzero().squeeze(-1)
        for i, a, gap in zip(valid_idx[:3].tolist(), (0.0, 1.0, -1.5), (1000.0, 30.0, 25.0), strict=True):
            tok["advantages"][i] = a
            tok["old_logp"][i] = lp[i] - gap
    return hidden, weight, bias, targets, tok


# name -> (PolicyLossConfig kwargs, per-token inputs passed, extra call kwargs)
_TRRD = ("teacher_logp",)
CASES = {
    "grpo": (dict(), (), {}),
    "trrd_geometric_clamp": (dict(alpha=0.5, teacher_clamp=1.0), _TRRD, {}),
    "trrd_geometric_noclamp": (dict(alpha=0.3, teacher_clamp=None, eps_low=0.15, eps_high=0.28), _TRRD, {}),
    "trrd_arithmetic": (dict(alpha=0.5, mixture="arithmetic"), _TRRD, {}),
    "dual_clip_with_cap": (dict(alpha=0.5, dual_clip=3.0), _TRRD, {"cap": True}),
    "grpo_ratio_cap": (dict(), (), {"cap": True}),
    "kd_k1": (dict(alpha=1.0, kd_estimator="k1", kd_coef=0.2), _TRRD + ("kd_weights",), {}),
    "kd_k2": (dict(alpha=1.0, kd_estimator="k2", kd_coef=0.2), _TRRD + ("kd_weights",), {}),
    "kd_k3": (dict(alpha=1.0, kd_estimator="k3", kd_coef=0.2), _TRRD + ("kd_weights",), {}),
    "ref_kl": (dict(alpha=0.5, ref_kl_coef=0.05), _TRRD + ("ref_logp",), {}),
    "entropy_bonus": (dict(alpha=0.5, entropy_coef=0.01), _TRRD, {}),
    "token_weights": (dict(alpha=0.5), _TRRD + ("token_weights",), {}),
    "normalizer_float": (dict(alpha=0.5), _TRRD + ("token_weights",), {"normalizer": 37.5}),
    "normalizer_tensor": (dict(), (), {"normalizer": torch.tensor(19.0)}),
}


def run_lib(*args, **kw):
    return run_policy_loss(*args, temperature=TEMP, **kw)


# ---------------------------------------------------------------------------- 1 + 2: loss, grads, metrics
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_loss_grads_metrics_match_reference(case, impl, device, small_chunks):
    want = check_against_reference(CASES[case], impl, sorted(CASES).index(case), device)
    if case in ("trrd_geometric_clamp", "kd_k2"):  # the brief's must-have metric cases (not vacuous)
        assert want["clip_frac_pos"] > 0 and want["clip_frac_neg"] > 0
    if case == "trrd_geometric_clamp":
        assert 0 < want["teacher_clamp_frac"] < 1
    if case.startswith("kd_"):  # alpha = 1: the teacher is only in the KD term, no teacher metrics
        assert "teacher_gap" not in want


def check_against_reference(spec, impl, seed, device):
    """Loss, gradients and metrics of one ``CASES``-style spec against the reference; returns the
    reference metrics."""
    cfg_kw, names, extra = spec
    cfg = PolicyLossConfig(**cfg_kw)
    dtype = torch.float32 if impl == "triton" else torch.float64
    tol_loss, tol_grad = (1e-5, 1e-4) if impl == "triton" else (1e-10, 1e-10)
    hidden, weight, bias, targets, tok = make_case(seed, dtype, cap=extra.get("cap", False))
    normalizer = extra.get("normalizer")

    # reference, on exactly the values the library sees (upcast to float64)
    rh, rw, rb = leaves(hidden, weight, bias, torch.float64)
    lp, ent = ref_lp_ent(rh, rw, targets, rb)
    valid = targets != IGNORE
    used = {k: tok[k].to(dtype).double() for k in ("advantages", "old_logp") + names}
    loss_ref, r, kx = ref_loss(lp, ent, valid, used, cfg, normalizer)
    loss_ref.backward()

    h, w, b = leaves(hidden, weight, bias, dtype, device)
    out = run_lib(impl, h, w, b, targets, tok, names, cfg, normalizer=normalizer)
    out.loss.backward()
    assert torch.isfinite(loss_ref)
    # relative to the loss, or to the sum of |terms| when they cancel (float32 sums err by eps * that)
    err = (out.loss.detach().double().cpu() - loss_ref.detach()).abs().item()
    assert err <= tol_loss * max(loss_ref.abs().item(), kx["abs_loss"].item()), (cfg, impl, out.loss.item(),
                                                                                 loss_ref.item())
    for name, got, want in (("hidden", h, rh), ("weight", w, rw), ("bias", b, rb)):
        assert rel(got.grad, want.grad) <= tol_grad, (cfg, impl, name, rel(got.grad, want.grad))
    assert rel(out.logp.cpu()[valid], lp[valid]) <= tol_loss

    # metrics, from our own counts over valid tokens
    A, r, ent, lp = used["advantages"][valid], r.detach()[valid], ent.detach()[valid], lp.detach()[valid]
    pos, neg = A > 0, A < 0
    n_clip_pos, n_clip_neg = (pos & (r > 1 + cfg.eps_high)).sum(), (neg & (r < 1 - cfg.eps_low)).sum()
    want = {
        "num_tokens": torch.tensor(float(valid.sum())),
        "clip_frac_pos": n_clip_pos / pos.sum().clamp_min(1),
        "clip_frac_neg": n_clip_neg / neg.sum().clamp_min(1),
        "clip_frac": (n_clip_pos + n_clip_neg) / valid.sum(),  # not in the brief's list; inferred
        "ratio_mean": r.mean(),
        "entropy_mean": ent.mean(),
    }
    if "teacher_logp" in names and cfg.alpha < 1:  # teacher metrics only where the teacher acts in the ratio
        old, lpT = used["old_logp"][valid], used["teacher_logp"][valid]
        want["teacher_gap"] = (old - lpT).mean()
        gate = ref_gate(A, old, lpT, cfg)
        if cfg.gated:
            want["teacher_gate_frac"] = gate.double().mean()
        if cfg.mixture == "geometric" and cfg.teacher_clamp is not None:
            hi, lo = (lp - lpT > cfg.teacher_clamp) & ~gate, (lp - lpT < -cfg.teacher_clamp) & ~gate
            want["teacher_clamp_hi"], want["teacher_clamp_lo"] = hi.double().mean(), lo.double().mean()
            want["teacher_clamp_frac"] = (hi | lo).double().mean()
    if "kd" in kx:
        want["kd_mean"] = kx["kd"].detach()[valid].mean()
    if "ref_kl" in kx:
        want["ref_kl_mean"] = kx["ref_kl"].detach()[valid].mean()  # inferred name/definition
    teacher_keys = {"teacher_gap", "teacher_gate_frac", "teacher_clamp_frac", "teacher_clamp_hi", "teacher_clamp_lo"}
    assert teacher_keys & set(out.metrics) == teacher_keys & set(want), (cfg, impl, sorted(out.metrics))
    for key, val in want.items():
        assert key in out.metrics, (cfg, key, sorted(out.metrics))
        got = out.metrics[key].double().cpu()
        assert torch.isclose(got, val.double(), rtol=1e-5, atol=1e-6), (cfg, impl, key, got.item(), val.item())
    return want


# ---------------------------------------------------------------------------- selective imitation options
# gated TRRD (both mixtures, each threshold alone and together) and the straight-through clamp
SELECTIVE = {
    "gated_geometric": (dict(alpha=0.5, teacher_align_threshold=1.5, teacher_adv_threshold=0.5), _TRRD, {}),
    "gated_geometric_align_dual_cap": (dict(alpha=0.3, teacher_align_threshold=1.0, dual_clip=3.0), _TRRD,
                                       {"cap": True}),
    "gated_arithmetic": (dict(alpha=0.5, mixture="arithmetic", teacher_align_threshold=1.2,
                              teacher_adv_threshold=0.3), _TRRD + ("token_weights",), {}),
    "gated_adv_noclamp": (dict(alpha=0.2, teacher_clamp=None, teacher_adv_threshold=0.8), _TRRD, {}),
    "straight_through": (dict(alpha=0.5, teacher_clamp_grad="straight_through"), _TRRD, {}),
    "straight_through_gated_alpha0": (dict(alpha=0.0, teacher_clamp=0.5, teacher_clamp_grad="straight_through",
                                           teacher_align_threshold=2.0), _TRRD, {}),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(SELECTIVE))
def test_selective_imitation_options_match_reference(case, impl, device, small_chunks):
    want = check_against_reference(SELECTIVE[case], impl, 200 + list(SELECTIVE).index(case), device)
    if "gated" in case:  # the gate fires on some tokens, not all
        assert 0 < want["teacher_gate_frac"] < 1
    if "straight" in case:  # tokens on both sides of the clamp
        assert want["teacher_clamp_hi"] > 0 and want["teacher_clamp_lo"] > 0


def _run_all(impl, dtype, device, case, runs):
    """(loss, d hidden, d weight, d bias, metrics) of each (per-token inputs, config) in ``runs``."""
    hidden, weight, bias, targets, tok = case
    results = []
    for names, cfg in runs:
        h, w, b = leaves(hidden, weight, bias, dtype, device)
        out = run_lib(impl, h, w, b, targets, tok, names, cfg)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, b.grad, out.metrics))
    return results


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mixture", ["geometric", "arithmetic"])
def test_gate_limits_are_exactly_trrd_and_grpo(mixture, impl, device):
    """Thresholds that never fire give exactly TRRD; thresholds that always fire give exactly GRPO
    (loss and gradients bit for bit)."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    base = dict(alpha=0.5, mixture=mixture)
    trrd, grpo, never, always_adv, always_align = _run_all(impl, dtype, device, make_case(105, dtype), [
        (_TRRD, PolicyLossConfig(**base)),
        ((), PolicyLossConfig(**base)),
        (_TRRD, PolicyLossConfig(**base, teacher_align_threshold=1e30, teacher_adv_threshold=0.0)),
        (_TRRD, PolicyLossConfig(**base, teacher_adv_threshold=1e30)),
        (_TRRD, PolicyLossConfig(**base, teacher_align_threshold=1e-30)),
    ])
    assert not torch.equal(trrd[1], grpo[1])  # the limits differ, so the checks below mean something
    for got, want in ((never, trrd), (always_adv, grpo), (always_align, grpo)):
        for x, y in zip(got[:4], want[:4], strict=True):
            assert torch.equal(x, y), (impl, mixture, (x - y).abs().max().item())
    assert never[4]["teacher_gate_frac"].item() == 0.0
    for m in (always_adv[4], always_align[4]):
        assert m["teacher_gate_frac"].item() == 1.0
        assert m.get("teacher_clamp_frac", torch.zeros(())).item() == 0.0
        assert torch.equal(m["ratio_mean"], grpo[4]["ratio_mean"])


def test_straight_through_changes_only_the_clamped_derivative():
    """Forward unchanged; d L / d lp_t is the same except on clamped tokens off the clip, where the
    straight-through clamp gives -A r (as unclamped) instead of -A r alpha."""
    seed = 106
    _, _, _, _, tok = make_case(seed, torch.float64)
    cfg = PolicyLossConfig(alpha=0.5, teacher_clamp=0.5)
    zero, r, lp, valid = recovered_dL_dlp(cfg, tok, _TRRD, seed)
    st, r_st, _, _ = recovered_dL_dlp(PolicyLossConfig(alpha=0.5, teacher_clamp=0.5,
                                                       teacher_clamp_grad="straight_through"), tok, _TRRD, seed)
    assert torch.equal(r, r_st)
    A, n = tok["advantages"], valid.sum()  # coef = dL_t/dlp_t / n (token mean)
    clamped = valid & ((lp - tok["teacher_logp"]).abs() > cfg.teacher_clamp)
    moved = clamped & (zero.abs() > 1e-9)  # clamped, off the clip, A != 0
    above = lp > tok["teacher_logp"]
    assert moved.sum() >= 3 and (moved & above).any() and (moved & ~above).any()  # both sides of the clamp
    torch.testing.assert_close(st[moved] * n, -A[moved] * r[moved], rtol=1e-9, atol=0)
    torch.testing.assert_close(zero[moved] * n, -A[moved] * r[moved] * cfg.alpha, rtol=1e-9, atol=0)
    torch.testing.assert_close(st[~clamped], zero[~clamped], rtol=1e-9, atol=1e-15)
    assert st[clamped & (zero.abs() <= 1e-9)].abs().max() < 1e-12  # the clip (or A = 0) still zeroes them


# ---------------------------------------------------------------------------- 3: properties
@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_one_is_exactly_grpo(impl, device):
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_case(101, dtype)
    results = []
    for names, cfg in (((), PolicyLossConfig()), (_TRRD, PolicyLossConfig(alpha=1.0))):
        h, w, b = leaves(hidden, weight, bias, dtype, device)
        out = run_lib(impl, h, w, b, targets, tok, names, cfg)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, b.grad))
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y), (impl, (x - y).abs().max().item())
    assert results[0][1].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_advantages_give_zero_gradient(impl, device):
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_case(102, dtype)
    tok["advantages"].zero_()
    h, w, b = leaves(hidden, weight, bias, dtype, device)
    out = run_lib(impl, h, w, b, targets, tok, _TRRD, PolicyLossConfig(alpha=0.5))
    out.loss.backward()
    assert out.loss.item() == 0.0
    for g in (h.grad, w.grad, b.grad):
        assert g is not None and torch.count_nonzero(g) == 0


def recovered_dL_dlp(cfg, tok, names, seed):
    """dL/dlp_t from the library's d loss / d hidden_t (float64, naive) and our d lp_t / d hidden_t."""
    hidden, weight, bias, targets, _ = make_case(seed, torch.float64)
    h, w, b = leaves(hidden, weight, bias, torch.float64)
    out = run_lib("naive", h, w, b, targets, tok, names, cfg)
    (g,) = torch.autograd.grad(out.loss, h)
    rh = hidden.detach().clone().requires_grad_(True)
    lp, _ = ref_lp_ent(rh, weight, targets, bias)
    (J,) = torch.autograd.grad(lp.sum(), rh)  # row t = d lp_t / d hidden_t
    coef = (g * J).sum(-1) / (J * J).sum(-1)
    # the loss depends on hidden_t only through lp_t: g_t must be parallel to J_t
    assert (g - coef[:, None] * J).abs().max() <= 1e-12 * g.abs().max()
    valid = targets != IGNORE
    _, r, _ = ref_token_loss(lp.detach(), torch.zeros_like(lp), tok["advantages"], tok["old_logp"], cfg,
                             tok.get("teacher_logp") if names else None)
    return coef, r, lp.detach(), valid


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_gradient_sign_and_clipped_tokens(alpha):
    seed = 103
    _, _, _, _, tok = make_case(seed, torch.float64)
    g = torch.Generator().manual_seed(7)
    tok["teacher_logp"] = tok["teacher_logp"] + 2.0 * torch.randn(tok["teacher_logp"].shape, generator=g,
                                                                   dtype=torch.float64)
    cfg = PolicyLossConfig(alpha=alpha, teacher_clamp=1.0)
    coef, r, lp, valid = recovered_dL_dlp(cfg, tok, _TRRD, seed)
    A = tok["advantages"]
    # (c) the loss is minimized: d loss / d lp_t has the sign of -A_t (or is zero)
    assert (coef * A)[valid].max() <= 1e-15, (coef * A)[valid].max().item()
    assert ((A > 0) & valid & (coef < -1e-6)).any() and ((A < 0) & valid & (coef > 1e-6)).any()  # not vacuous
    assert (coef[~valid] == 0).all()
    # (d) tokens in the clipped region get exactly no gradient
    clipped = valid & (((A > 0) & (r > 1 + cfg.eps_high)) | ((A < 0) & (r < 1 - cfg.eps_low)))
    assert clipped.sum() >= 1
    assert coef[clipped].abs().max() < 1e-12, coef[clipped]
    if alpha == 0.0:  # the ratio is fully teacher-anchored: clamped tokens get no gradient either
        clamped = valid & ((lp - tok["teacher_logp"]).abs() > cfg.teacher_clamp)
        assert clamped.sum() >= 1 and coef[clamped].abs().max() < 1e-12


def test_alignment_thresholds_of_the_readme():
    """README "Selective imitation": at lp = lp_old, with alpha = 0.5, eps 0.2, c = 1, a token starts
    clipped (no gradient) once lp_old - lp_T exceeds log(1.2)/0.5 = 0.365 nats (A > 0), or
    lp_T - lp_old exceeds -log(0.8)/0.5 = 0.446 nats (A < 0); just inside, it gets a gradient."""
    seed = 107
    hidden, weight, bias, targets, tok = make_case(seed, torch.float64)
    lp, _ = ref_lp_ent(hidden, weight, targets, bias)
    N = lp.shape[0]
    pattern = torch.tensor([(1.0, 0.36), (1.0, 0.37), (-1.0, -0.44), (-1.0, -0.45)], dtype=torch.float64)
    A, gap = pattern.repeat(N // 4 + 1, 1)[:N].T
    tok = dict(advantages=A.clone(), old_logp=lp.clone(), teacher_logp=lp - gap)
    coef, _, _, valid = recovered_dL_dlp(PolicyLossConfig(alpha=0.5, eps_low=0.2, eps_high=0.2, teacher_clamp=1.0),
                                         tok, _TRRD, seed)
    inside = torch.tensor([True, False, True, False]).repeat(N // 4 + 1)[:N]
    assert (valid & inside).sum() >= 4 and (valid & ~inside).sum() >= 4
    assert (coef[valid & inside].abs() > 1e-6).all()
    assert (coef[valid & ~inside].abs() < 1e-12).all()


# ---------------------------------------------------------------------------- 4: nothing valid
@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero(impl, device):
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_case(104, dtype)
    targets = torch.full_like(targets, IGNORE)
    cfg = PolicyLossConfig(alpha=0.5, kd_estimator="k3", kd_coef=0.1, ref_kl_coef=0.05, entropy_coef=0.01)
    h, w, b = leaves(hidden, weight, bias, dtype, device)
    out = run_lib(impl, h, w, b, targets, tok, _TRRD + ("ref_logp", "kd_weights", "token_weights"), cfg)
    out.loss.backward()
    assert out.loss.item() == 0.0
    for g in (h.grad, w.grad, b.grad):
        assert g is not None and torch.count_nonzero(g) == 0 and not torch.isnan(g).any()
    for key, val in out.metrics.items():
        assert not torch.isnan(val).any(), key
    assert out.metrics["num_tokens"].item() == 0.0
