"""Policy-loss variants: GSPO (sequence-level ratio), CISPO, their TRRD forms, and TRL's token-mean
entropy bonus, against float64 references written here from the specification (not from ``math.py``).

Inputs are ``[B, L]`` batches of sequences at small odd shapes: rows of different lengths, an ignored
token inside a row, and a row with no valid token at all. Every case is checked for the loss, the
gradients w.r.t. hidden, weight and bias, and the metrics, for impl naive / torch / triton (the
Triton kernels on the GPU when there is one, in Triton's CPU interpreter otherwise).

Tolerances as in ``test_policy_formula.py``: float64 impls 1e-10 relative; triton (float32 inputs,
compared with the float64 reference on the same float32 values) 1e-5 on the loss, 1e-4 on gradients.
"""

from __future__ import annotations

import pytest
import torch

from rlad_kernels import LinearPolicyLoss, LMHead, PolicyLossConfig, TokenInputs, linear_policy_loss

from helpers import leaves, ref_gate, ref_token_log_ratio, run_policy_loss
from helpers import rel_finite as rel

IMPLS = ["naive", "torch", "triton"]
IGNORE = -100
TEMP = 0.7
B, L, H, V = 6, 7, 24, 97
LENGTHS = (7, 4, 0, 6, 5, 3)     # valid tokens per row (row 2 has none); row 3 also loses token 1
ROW_SHIFT = (-0.5, 0.05, 0.0, 0.4, -0.35, 0.3)  # lp_old - lp per row: rows 0 and 3 clipped at sequence level
ROW_ADV = (1.0, 0.7, 0.5, -1.2, -0.4, 0.9)


# ---------------------------------------------------------------------------- reference
def ref_lp_ent(hidden, weight, bias, targets):
    """float64 log-prob of ``targets`` and entropy from materialized logits ([B, L])."""
    logits = hidden.double() @ weight.double().T + bias.double()
    logp_all = torch.log_softmax(logits / TEMP, dim=-1)
    idx = torch.where(targets != IGNORE, targets, torch.zeros_like(targets))
    lp = logp_all.gather(-1, idx[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent


def ref_loss(lp, ent, valid, tok, cfg, normalizer=None, entropy_normalizer=None):
    """(loss, per-token ratio [B, L], per-token loss terms) straight from the specification."""
    A, old, teacher = tok["advantages"], tok["old_logp"], tok.get("teacher_logp")
    log_r = ref_token_log_ratio(lp, A, old, teacher, cfg)
    m = valid.double()
    if cfg.ratio_level == "sequence":  # GSPO: the row's mean log-ratio over its valid tokens, on every token
        log_r = ((log_r * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(lp)
    r = torch.exp(log_r.clamp(max=20.0))
    if cfg.objective == "cispo":
        L_t = -torch.minimum(r, torch.tensor(cfg.cispo_max, dtype=r.dtype)).detach() * A * lp
    else:
        L_t = torch.maximum(-A * r, -A * r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))
        if cfg.dual_clip is not None:
            L_t = torch.where(A < 0, torch.minimum(L_t, -cfg.dual_clip * A), L_t)
    extra = {}
    if cfg.ref_kl_coef != 0:
        x = tok["ref_logp"] - lp
        extra["ref_kl"] = x.exp() - x - 1
        L_t = L_t + cfg.ref_kl_coef * extra["ref_kl"]
    if cfg.kd_estimator == "k2":
        extra["kd"] = (teacher - lp) ** 2 / 2
        L_t = L_t + cfg.kd_coef * extra["kd"]
    if cfg.entropy_aggregation == "loss":
        L_t = L_t - cfg.entropy_coef * ent
    w = tok.get("token_weights", torch.ones_like(lp))
    total = (torch.where(valid, w * L_t, 0.0)).sum()
    norm = float(normalizer) if normalizer is not None else max(w[valid].sum().item(), 1.0)
    loss = total / norm
    if cfg.entropy_aggregation == "token_mean":
        e_norm = float(entropy_normalizer) if entropy_normalizer is not None else max(valid.sum().item(), 1)
        loss = loss - cfg.entropy_coef * torch.where(valid, ent, 0.0).sum() / e_norm
    extra["abs"] = (torch.where(valid, (w * L_t).abs(), 0.0).sum() / norm).detach()
    return loss, r.detach(), extra


# ---------------------------------------------------------------------------- inputs
def make_batch(seed):
    """hidden [B, L, H], weight, bias, targets [B, L] and float64 per-token inputs [B, L]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    bias = torch.randn(V, generator=g) * 0.5
    targets = torch.randint(0, V, (B, L), generator=g)
    for i, n in enumerate(LENGTHS):
        targets[i, n:] = IGNORE
    targets[3, 1] = IGNORE
    lp, _ = ref_lp_ent(hidden, weight, bias, targets)
    noise = lambda s: s * torch.randn(B, L, generator=g, dtype=torch.float64)  # noqa: E731
    A = torch.tensor(ROW_ADV, dtype=torch.float64)[:, None].expand(B, L).clone()
    tok = dict(
        advantages=A,
        old_logp=lp + torch.tensor(ROW_SHIFT, dtype=torch.float64)[:, None] + noise(0.3),
        teacher_logp=lp + noise(1.5),
        ref_logp=lp + noise(0.4),
        token_weights=torch.rand(B, L, generator=g, dtype=torch.float64) + 0.1,
    )
    return hidden, weight, bias, targets, tok


def run_lib(*args, **kw):
    return run_policy_loss(*args, temperature=TEMP, **kw)


# name -> (PolicyLossConfig kwargs, per-token inputs passed, call kwargs)
_T = ("teacher_logp",)
SEQ = dict(ratio_level="sequence")
CISPO = dict(objective="cispo", cispo_max=1.3)
ENT_MEAN = dict(entropy_coef=0.05, entropy_aggregation="token_mean")
CASES = {
    "gspo": (dict(SEQ), (), {}),
    "gspo_trrd": (dict(SEQ, alpha=0.5), _T, {}),
    "gspo_trrd_alpha0_noclamp": (dict(SEQ, alpha=0.0, teacher_clamp=None), _T, {}),
    "gspo_trrd_gated_straight_through": (dict(SEQ, alpha=0.3, teacher_align_threshold=1.5, teacher_adv_threshold=0.6,
                                              teacher_clamp=0.5, teacher_clamp_grad="straight_through"), _T, {}),
    "gspo_trrd_arithmetic": (dict(SEQ, alpha=0.5, mixture="arithmetic"), _T + ("token_weights",), {}),
    "gspo_dual_ref_entropy": (dict(SEQ, dual_clip=1.3, ref_kl_coef=0.05, entropy_coef=0.02), ("ref_logp",), {}),
    "gspo_kdrl_k2": (dict(SEQ, alpha=1.0, kd_estimator="k2", kd_coef=0.2), _T, {}),
    "gspo_weights_normalizer": (dict(SEQ, alpha=0.5), _T + ("token_weights",), {"normalizer": 4.5}),
    "cispo": (dict(CISPO), (), {}),
    "cispo_trrd": (dict(CISPO, alpha=0.5), _T, {}),
    "cispo_trrd_gated_ref_k2": (dict(CISPO, alpha=0.4, teacher_align_threshold=1.5, ref_kl_coef=0.05,
                                     kd_estimator="k2", kd_coef=0.1), _T + ("ref_logp",), {}),
    "cispo_trrd_arithmetic_weights": (dict(CISPO, alpha=0.5, mixture="arithmetic"), _T + ("token_weights",),
                                      {"normalizer": 9.0}),
    "gspo_cispo": (dict(SEQ, **CISPO), (), {}),
    "gspo_cispo_trrd": (dict(SEQ, **CISPO, alpha=0.5), _T, {}),
    "entropy_token_mean": (dict(ENT_MEAN, alpha=0.5), _T + ("token_weights",), {}),
    "entropy_token_mean_normalizers": (dict(ENT_MEAN), ("token_weights",), {"normalizer": 7.0,
                                                                            "entropy_normalizer": 61.0}),
    "entropy_token_mean_tensor_gspo": (dict(ENT_MEAN, **SEQ), ("token_weights",),
                                       {"entropy_normalizer": torch.tensor(40.0)}),
    "entropy_token_mean_cispo_trrd": (dict(ENT_MEAN, **CISPO, alpha=0.5), _T, {"entropy_normalizer": 3.0}),
}


def check_case(name, impl, device):
    cfg_kw, names, kw = CASES[name]
    cfg = PolicyLossConfig(**cfg_kw)
    dtype = torch.float32 if impl == "triton" else torch.float64
    tol_loss, tol_grad = (1e-5, 1e-4) if impl == "triton" else (1e-10, 1e-10)
    hidden, weight, bias, targets, tok = make_batch(sorted(CASES).index(name))
    valid = targets != IGNORE

    rh, rw, rb = leaves(hidden, weight, bias, torch.float64)
    lp, ent = ref_lp_ent(rh, rw, rb, targets)
    used = {k: tok[k].to(dtype).double() for k in ("advantages", "old_logp") + names}
    loss_ref, r, extra = ref_loss(lp, ent, valid, used, cfg, kw.get("normalizer"), kw.get("entropy_normalizer"))
    loss_ref.backward()

    h, w, b = leaves(hidden, weight, bias, dtype, device)
    out = run_lib(impl, h, w, b, targets, tok, names, cfg, **kw)
    out.loss.backward()
    err = (out.loss.detach().double().cpu() - loss_ref.detach()).abs().item()
    assert err <= tol_loss * max(loss_ref.abs().item(), extra["abs"].item()), (name, impl, out.loss.item(),
                                                                              loss_ref.item())
    for what, got, want in (("hidden", h, rh), ("weight", w, rw), ("bias", b, rb)):
        assert rel(got.grad, want.grad) <= tol_grad, (name, impl, what, rel(got.grad, want.grad))
    assert out.logp.shape == targets.shape

    # metrics: fractions of valid tokens (at sequence level, each token carries its sequence's ratio)
    A, r, e = used["advantages"][valid], r[valid], ent.detach()[valid]
    pos, neg = A > 0, A < 0
    if cfg.objective == "cispo":
        capped = r > cfg.cispo_max
        n_pos, n_neg = (pos & capped).sum(), (neg & capped).sum()
    else:
        n_pos, n_neg = (pos & (r > 1 + cfg.eps_high)).sum(), (neg & (r < 1 - cfg.eps_low)).sum()
    want = {
        "num_tokens": valid.sum().double(),
        "clip_frac": (n_pos + n_neg) / valid.sum(),
        "clip_frac_pos": n_pos / pos.sum().clamp_min(1),
        "clip_frac_neg": n_neg / neg.sum().clamp_min(1),
        "ratio_mean": r.mean(),
        "entropy_mean": e.mean(),
    }
    if cfg.objective == "cispo":
        want["cispo_cap_frac"] = capped.double().mean()
    if "teacher_logp" in names and cfg.alpha < 1:
        old, lpT, lpv = used["old_logp"][valid], used["teacher_logp"][valid], lp.detach()[valid]
        want["teacher_gap"] = (old - lpT).mean()
        gate = ref_gate(A, old, lpT, cfg)
        if cfg.gated:
            want["teacher_gate_frac"] = gate.double().mean()
        if cfg.mixture == "geometric" and cfg.teacher_clamp is not None:
            hi = (lpv - lpT > cfg.teacher_clamp) & ~gate
            lo = (lpv - lpT < -cfg.teacher_clamp) & ~gate
            want.update(teacher_clamp_hi=hi.double().mean(), teacher_clamp_lo=lo.double().mean(),
                        teacher_clamp_frac=(hi | lo).double().mean())
    if cfg.dual_clip is not None:
        pg = torch.maximum(-A * r, -A * r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))
        want["dual_clip_frac"] = (neg & (-cfg.dual_clip * A < pg)).sum() / neg.sum().clamp_min(1)
    if "kd" in extra:
        want["kd_mean"] = extra["kd"].detach()[valid].mean()
    if "ref_kl" in extra:
        want["ref_kl_mean"] = extra["ref_kl"].detach()[valid].mean()
    assert set(out.metrics) == set(want), (name, sorted(out.metrics), sorted(want))
    for key, val in want.items():
        got = out.metrics[key].double().cpu()
        assert torch.isclose(got, val.double(), rtol=1e-5, atol=1e-6), (name, impl, key, got.item(), val.item())
    return want


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_variants_match_reference(case, impl, device, small_chunks):
    want = check_case(case, impl, device)
    if case in ("gspo", "cispo", "gspo_cispo", "cispo_trrd"):  # both sides of the clip / cap are hit
        assert 0 < want["clip_frac_pos"] < 1 and 0 < want["clip_frac_neg"] < 1, want
    if case == "gspo_dual_ref_entropy":
        assert want["dual_clip_frac"] > 0
    if case == "gspo_trrd":
        assert 0 < want["teacher_clamp_frac"] < 1
    if case == "gspo_trrd_gated_straight_through":  # the gate drops some tokens; the clamp binds on others
        assert 0 < want["teacher_gate_frac"] < 1 and want["teacher_clamp_frac"] > 0, want


# ---------------------------------------------------------------------------- exact reductions
def _run(impl, dtype, device, runs, seed=3, **kw):
    """(loss, d hidden, d weight, d bias, metrics) for each (per-token inputs, config, targets view) in ``runs``."""
    hidden, weight, bias, targets, tok = make_batch(seed)
    results = []
    for names, cfg in runs:
        h, w, b = leaves(hidden, weight, bias, dtype, device)
        out = run_lib(impl, h, w, b, targets, tok, names, cfg, **kw)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, b.grad, out.metrics))
    return results


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["gspo", "cispo", "gspo_cispo"])
def test_alpha_one_is_exactly_the_plain_variant(variant, impl, device, small_chunks):
    """GSPO+TRRD and CISPO+TRRD with alpha = 1 are plain GSPO / CISPO, bit for bit; alpha < 1 differs."""
    kw = {"gspo": SEQ, "cispo": CISPO, "gspo_cispo": dict(SEQ, **CISPO)}[variant]
    dtype = torch.float32 if impl == "triton" else torch.float64
    plain, alpha1, trrd = _run(impl, dtype, device, [((), PolicyLossConfig(**kw)),
                                                      (_T, PolicyLossConfig(**kw, alpha=1.0)),
                                                      (_T, PolicyLossConfig(**kw, alpha=0.5))])
    for x, y in zip(plain[:4], alpha1[:4], strict=True):
        assert torch.equal(x, y), (variant, impl, (x - y).abs().max().item())
    assert set(plain[4]) == set(alpha1[4])  # no teacher metric at alpha = 1
    assert not torch.equal(plain[1], trrd[1]) and plain[1].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_one_token_sequences_are_the_token_level_loss(impl, device):
    """With one token per row, the sequence ratio is the token ratio: GSPO is GRPO (TRRD likewise)."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(5)
    cols = []
    for level in ("token", "sequence"):
        h, w, b = leaves(hidden, weight, bias, dtype, device)
        t = {k: v.reshape(-1, 1) for k, v in tok.items()}
        out = run_lib(impl, h.reshape(-1, 1, H), w, b, targets.reshape(-1, 1), t, _T,
                      PolicyLossConfig(ratio_level=level, alpha=0.5))
        out.loss.backward()
        cols.append((out.loss.detach(), h.grad, w.grad, b.grad))
    for x, y in zip(*cols, strict=True):
        if impl == "naive":  # the same code path at both levels: bit for bit
            assert torch.equal(x, y)
        else:
            assert rel(x, y) <= (1e-5 if impl == "triton" else 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_token_mean_ignores_weights_and_normalizer(impl, device, small_chunks):
    """The token-mean bonus is the same whatever the token weights and the loss normalizer: the
    difference of two configs that differ only in entropy_coef is -entropy_coef * mean H."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(8)
    lp, ent = ref_lp_ent(hidden.to(dtype), weight.to(dtype), bias.to(dtype), targets)
    mean_h = ent[targets != IGNORE].mean()
    for names, kw in (((), {}), (("token_weights",), {"normalizer": 3.0})):
        (with_bonus, *_), (without, *_) = _run(impl, dtype, device, [
            (names, PolicyLossConfig(**ENT_MEAN)), (names, PolicyLossConfig())], seed=8, **kw)
        diff = (with_bonus - without).double().cpu()
        torch.testing.assert_close(diff, -0.05 * mean_h, rtol=1e-4 if impl == "triton" else 1e-10, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_micro_batches_with_global_entropy_normalizer(impl, device, small_chunks):
    """Two micro-batches with the global token count as normalizer and entropy_normalizer add up
    to the whole batch (loss and gradients)."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(9)
    n = float((targets != IGNORE).sum())
    cfg = PolicyLossConfig(**ENT_MEAN, **SEQ, objective="cispo")

    def run(rows, norm_kw):
        h, w, b = leaves(hidden[rows], weight, bias, dtype, device)
        out = run_lib(impl, h, w, b, targets[rows], {k: v[rows] for k, v in tok.items()}, _T, cfg, **norm_kw)
        out.loss.backward()
        return out.loss.detach(), w.grad, b.grad

    whole = run(slice(None), {})
    parts = [run(rows, dict(normalizer=n, entropy_normalizer=n)) for rows in (slice(0, 2), slice(2, None))]
    for i in range(3):
        torch.testing.assert_close(parts[0][i] + parts[1][i], whole[i], rtol=1e-5 if impl == "triton" else 1e-10,
                                   atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_full_kd_adds_the_same_term_at_both_levels(impl, device):
    """kd_estimator="full" at sequence level: the exact reverse-KL term does not depend on the ratio
    level, so (with KD) - (without KD) is the same at token and sequence level, and it is the
    float64 KL of the teacher's logits."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(17)
    g = torch.Generator().manual_seed(18)
    th, tw = torch.randn(B, L, 19, generator=g), torch.randn(V, 19, generator=g) * 0.4
    valid = targets != IGNORE
    s_logp = torch.log_softmax((hidden.double() @ weight.double().T + bias.double()) / TEMP, -1)
    t_logp = torch.log_softmax((th.double() @ tw.double().T) / TEMP, -1)
    kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    want = 0.3 * kl[valid].mean()
    teacher = dict(teacher_hidden=th.to(device=device, dtype=dtype), teacher_weight=tw.to(device=device, dtype=dtype))
    deltas = []
    for level in ("token", "sequence"):
        (with_kd, *_), (without, *_) = _run(impl, dtype, device, [
            (_T, PolicyLossConfig(ratio_level=level, alpha=1.0, kd_estimator="full", kd_coef=0.3)),
            (_T, PolicyLossConfig(ratio_level=level, alpha=1.0))], seed=17, **teacher)
        deltas.append((with_kd - without).double().cpu())
    tol = 1e-4 if impl == "triton" else 1e-10
    for d in deltas:
        torch.testing.assert_close(d, want, rtol=tol, atol=1e-7)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", ["gspo_cispo_trrd", "cispo_trrd", "entropy_token_mean"])
def test_bfloat16_inputs(case, impl, device, small_chunks):
    """bf16 hidden states and weight: the loss within 1e-5 and the gradients within 1e-2 of the
    float64 reference on the same bf16 values."""
    cfg_kw, names, kw = CASES[case]
    cfg = PolicyLossConfig(**cfg_kw)
    hidden, weight, bias, targets, tok = make_batch(19)
    hidden, weight, bias = (t.bfloat16() for t in (hidden, weight, bias))
    rh, rw, rb = leaves(hidden, weight, bias, torch.float64)
    lp, ent = ref_lp_ent(rh, rw, rb, targets)
    used = {k: tok[k].float().double() for k in ("advantages", "old_logp") + names}
    want, _, _ = ref_loss(lp, ent, targets != IGNORE, used, cfg, kw.get("normalizer"), kw.get("entropy_normalizer"))
    want.backward()
    h, w, b = leaves(hidden, weight, bias, torch.bfloat16, device)
    out = run_lib(impl, h, w, b, targets, tok, names, cfg, input_dtype=torch.float32, **kw)
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel(out.loss, want) <= 1e-5, (case, impl)
    for got, ref in ((h, rh), (w, rw), (b, rb)):
        assert rel(got.grad, ref.grad) <= 1e-2, (case, impl)


# ---------------------------------------------------------------------------- TRL's formulas
def trl_loss(lp, old, A, mask, ent, *, level, loss_type, eps_low=0.2, eps_high=0.2, entropy_coef=0.0,
             num_items=None, accumulation=1):
    """TRL's GRPOTrainer._compute_loss, rewritten here in float64 (sequence advantages [B], mask [B, L])."""
    log_ratio = lp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    adv = A.unsqueeze(1)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    else:  # cispo / dapo: the global token count of the accumulation window
        loss = (per_token_loss * mask).sum() / (num_items * accumulation)
    if entropy_coef:
        loss = loss - entropy_coef * (ent * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    return loss


TRL_CASES = {  # name -> (trl_loss kwargs, PolicyLossConfig kwargs)
    "gspo_grpo": (dict(level="sequence", loss_type="grpo", eps_low=3e-4, eps_high=4e-4),
                  dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4)),
    "gspo_dapo_entropy": (dict(level="sequence", loss_type="dapo", entropy_coef=0.01, accumulation=2),
                          dict(ratio_level="sequence", entropy_coef=0.01, entropy_aggregation="token_mean")),
    "cispo": (dict(level="token", loss_type="cispo", eps_high=1.3), dict(objective="cispo", cispo_max=1.3)),
    "cispo_sequence_entropy": (dict(level="sequence", loss_type="cispo", eps_high=1.1, entropy_coef=0.02,
                                    accumulation=4),
                               dict(ratio_level="sequence", objective="cispo", cispo_max=1.1, entropy_coef=0.02,
                                    entropy_aggregation="token_mean")),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(TRL_CASES))
def test_matches_trl_formulas(case, impl, device, small_chunks):
    """Our GSPO and CISPO losses (no teacher) equal TRL's, loss type by loss type: "grpo" (the mean of
    sequence means: token weights 1/|o_i|, normalizer B), "dapo" / "cispo" (the token count; with
    accumulation, normalizer and entropy_normalizer = count x steps)."""
    trl_kw, cfg_kw = TRL_CASES[case]
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(11 + list(TRL_CASES).index(case))
    mask = (targets != IGNORE).double()
    n_i = mask.sum(-1, keepdim=True)
    acc = trl_kw.get("accumulation", 1)
    if trl_kw["loss_type"] == "grpo":
        names, kw = ("token_weights",), dict(normalizer=float(B * acc))
        tok["token_weights"] = (1.0 / n_i.clamp(min=1)).expand(B, L)
    else:
        names, kw = (), dict(normalizer=float(mask.sum()) * acc)
    if trl_kw.get("entropy_coef"):
        kw["entropy_normalizer"] = float(mask.sum()) * acc

    rh, rw, rb = leaves(hidden, weight, bias, torch.float64)
    lp, ent = ref_lp_ent(rh, rw, rb, targets)
    old = tok["old_logp"].to(dtype).double()
    want = trl_loss(lp, old, tok["advantages"][:, 0].to(dtype).double(), mask, ent,
                    num_items=float(mask.sum()), **trl_kw)
    want.backward()

    h, w, b = leaves(hidden, weight, bias, dtype, device)
    out = run_lib(impl, h, w, b, targets, tok, names, PolicyLossConfig(**cfg_kw), **kw)
    out.loss.backward()
    tol_loss, tol_grad = (1e-5, 1e-4) if impl == "triton" else (1e-12, 1e-10)
    assert rel(out.loss, want) <= tol_loss, (case, impl, out.loss.item(), want.item())
    for what, got, ref in (("hidden", h, rh), ("weight", w, rw), ("bias", b, rb)):
        assert rel(got.grad, ref.grad) <= tol_grad, (case, impl, what)
    assert rh.grad.abs().max() > 0


# ---------------------------------------------------------------------------- non-finite inputs, garbage
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["gspo", "cispo"])
def test_non_finite_inputs_give_nan(variant, impl, device):
    """A non-finite input on a valid token gives a NaN loss: at sequence level even +inf lp_old, which
    would make the row's mean log-ratio -inf and its ratio 0 (a clipped, finite loss) if not caught."""
    cfg = PolicyLossConfig(**(SEQ if variant == "gspo" else CISPO), alpha=0.5)
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(13)
    for key, value in (("old_logp", float("inf")), ("advantages", float("nan")), ("teacher_logp", float("-inf"))):
        bad = {k: v.clone() for k, v in tok.items()}
        bad[key][0, 2] = value
        h, w, b = leaves(hidden, weight, bias, dtype, device)
        out = run_lib(impl, h, w, b, targets, bad, _T, cfg)
        assert torch.isnan(out.loss), (variant, impl, key)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["gspo_trrd", "cispo_trrd", "entropy_token_mean"])
def test_garbage_in_ignored_positions_is_ignored(variant, impl, device, small_chunks):
    """NaN / inf in ignored positions of every per-token input change nothing (the row with no valid
    token included)."""
    cfg_kw, names, _ = CASES[variant]
    cfg = PolicyLossConfig(**cfg_kw)
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, tok = make_batch(14)
    ignored = targets == IGNORE
    dirty = {k: torch.where(ignored, float("nan") if k != "old_logp" else float("inf"), v) for k, v in tok.items()}
    results = []
    for t in (tok, dirty):
        h, w, b = leaves(hidden, weight, bias, dtype, device)
        out = run_lib(impl, h, w, b, targets, t, names + ("token_weights",), cfg)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, b.grad))
    for x, y in zip(*results, strict=True):
        assert torch.isfinite(y).all() and torch.equal(x, y), (variant, impl)


# ---------------------------------------------------------------------------- module, errors
def test_module_passes_entropy_normalizer(device):
    hidden, weight, bias, targets, tok = make_batch(15)
    cfg = PolicyLossConfig(**ENT_MEAN, **SEQ)
    args = (hidden.to(device), LMHead(weight.to(device), bias=bias.to(device)), targets.to(device),
            TokenInputs(tok["advantages"].float().to(device), tok["old_logp"].float().to(device)))
    got = LinearPolicyLoss(cfg, temperature=TEMP, impl="torch")(*args, entropy_normalizer=50.0)
    want = linear_policy_loss(*args, temperature=TEMP, config=cfg, impl="torch", entropy_normalizer=50.0)
    assert torch.equal(got.loss, want.loss)


@pytest.mark.parametrize("kw,msg", [
    (dict(ratio_level="group"), r"unknown PolicyLossConfig.ratio_level 'group'"),
    (dict(objective="ppo"), r"unknown PolicyLossConfig.objective 'ppo'"),
    (dict(entropy_aggregation="sum"), r"unknown PolicyLossConfig.entropy_aggregation 'sum'"),
    (dict(objective="cispo", cispo_max=0.0), r"cispo_max must be > 0"),
    (dict(objective="cispo", cispo_max=float("inf")), r"cispo_max must be finite"),
    (dict(objective="cispo", dual_clip=3.0), r"dual_clip=3.0 has no meaning with objective='cispo'"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PolicyLossConfig(**kw)


def test_call_errors(device):
    hidden, weight, bias, targets, tok = make_batch(16)
    h, w, y = hidden.to(device), LMHead(weight.to(device)), targets.to(device)
    A, old = tok["advantages"].float().to(device), tok["old_logp"].float().to(device)
    inputs = TokenInputs(A, old)
    with pytest.raises(ValueError, match=r"ratio_level='sequence' needs targets of shape \[\.\.\., L\].*got shape "
                                         r"\(42,\)"):
        linear_policy_loss(h.reshape(-1, H), w, y.reshape(-1), inputs.map(lambda t: t.reshape(-1)),
                           config=PolicyLossConfig(**SEQ))
    with pytest.raises(ValueError, match=r"entropy_normalizer is used only with entropy_aggregation='token_mean'"):
        linear_policy_loss(h, w, y, inputs, config=PolicyLossConfig(entropy_coef=0.1), entropy_normalizer=10.0)
    for bad, msg in ((0.0, r"entropy_normalizer must be > 0"),
                     (torch.tensor([1.0, 2.0]), r"entropy_normalizer must be a number or a 1-element")):
        with pytest.raises(ValueError, match=msg):
            linear_policy_loss(h, w, y, inputs, config=PolicyLossConfig(**ENT_MEAN),
                               entropy_normalizer=bad.to(device) if isinstance(bad, torch.Tensor) else bad)
