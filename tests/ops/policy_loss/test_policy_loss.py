"""linear_policy_loss: the three implementations agree with the float64 reference on every branch.

The Triton path evaluates the per-token math in its fused epilogue with closed-form
derivatives; the torch and naive paths differentiate ``math.policy_token_loss`` with autograd.
The inputs below put tokens on every branch (both clip sides, teacher clamp on and off, dual
clip, log-ratio cap with A = 0 and A > 0, ignored tokens) and the tests assert that each
branch is actually hit, so agreement is not vacuous. Hidden-state gradients are compared row by
row: a row's gradient is (dL/dlp_t) times d lp_t/d h_t, so one wrong per-token factor fails.
"""

import pytest
import torch

from rlad_kernels import PolicyLossConfig, linear_logprobs, linear_policy_loss, triton_config
from rlad_kernels.ops.common.chunked import ScaledHead

from helpers import assert_rel, make_lm_inputs

CONFIGS = {
    "trrd": PolicyLossConfig(),
    "trrd_noclamp_dual": PolicyLossConfig(teacher_clamp=None, dual_clip=3.0),
    "trrd_alpha0_asym": PolicyLossConfig(alpha=0.0, eps_low=0.1, eps_high=0.28),
    "arithmetic": PolicyLossConfig(mixture="arithmetic", alpha=0.3),
    "grpo": PolicyLossConfig(),  # run without teacher_logp
    "kdrl_k1": PolicyLossConfig(alpha=1.0, kd_estimator="k1", kd_coef=0.3),
    "kdrl_k2_ref_ent": PolicyLossConfig(alpha=1.0, kd_estimator="k2", kd_coef=0.2, ref_kl_coef=0.05,
                                        entropy_coef=0.01),
    "kdrl_k3_dual": PolicyLossConfig(alpha=1.0, kd_estimator="k3", kd_coef=0.1, dual_clip=2.0),
    "trrd_entropy_bonus": PolicyLossConfig(entropy_coef=-0.02, ref_kl_coef=0.1),
    "trrd_gated_straight_through": PolicyLossConfig(teacher_align_threshold=1.5, teacher_adv_threshold=0.4,
                                                    teacher_clamp_grad="straight_through"),
    "arithmetic_gated_dual": PolicyLossConfig(mixture="arithmetic", alpha=0.3, teacher_align_threshold=1.0,
                                              dual_clip=2.0),
}


def branch_inputs(N=97, H=31, V=131, dtype=torch.float32, seed=0, bias=True):
    hidden, weight, b, targets = make_lm_inputs(N, H, V, dtype=dtype, bias=bias, seed=seed, ignore_frac=0.1)
    with torch.no_grad():
        lp = linear_logprobs(hidden.double(), weight.double(), targets, bias=b.double() if bias else None,
                             temperature=0.8, impl="naive").float().cpu()  # drawn on the CPU, moved below
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(N, generator=g) * 1.5
    adv[::9] = 0.0
    old = lp + torch.randn(N, generator=g) * 0.35
    teacher = lp + torch.randn(N, generator=g) * 1.5
    ref = lp + torch.randn(N, generator=g) * 0.3
    # log-ratio above the cap (r would overflow): with A = 0 (must stay finite) and A > 0 (clipped)
    old[1], adv[1] = lp[1] - 40.0, 0.0
    old[2], adv[2] = lp[2] - 40.0, 1.0
    old[3], adv[3] = lp[3] - 3.0, -2.0  # large ratio with A < 0: the dual clip's region
    old[4], adv[4] = lp[4] - 3.0, -1.0
    dev = hidden.device
    tok = dict(advantages=adv, old_logp=old, teacher_logp=teacher, ref_logp=ref,
               token_weights=torch.rand(N, generator=g) + 0.5, kd_weights=(torch.rand(N, generator=g) > 0.3).float())
    return hidden, weight, b, targets, {k: v.to(dev) for k, v in tok.items()}


def _call(impl, name, hidden, weight, b, targets, tok, **kw):
    cfg = CONFIGS[name]
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    out = linear_policy_loss(
        h, w, targets, tok["advantages"], tok["old_logp"],
        teacher_logp=None if name == "grpo" else tok["teacher_logp"],
        ref_logp=tok["ref_logp"] if cfg.ref_kl_coef else None,
        token_weights=tok["token_weights"],
        kd_weights=tok["kd_weights"] if cfg.kd_estimator else None,
        bias=bb, temperature=0.8, config=cfg, impl=impl, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, bb.grad if bb is not None else None


def _assert_rows(actual, expected, tol, what):
    a, e = actual.double().cpu(), expected.double().cpu()
    floor = 1e-6 * e.abs().max()
    err = (a - e).abs().amax(dim=1)
    bound = tol * e.abs().amax(dim=1) + floor
    bad = (err > bound).nonzero().flatten().tolist()
    assert not bad, f"{what}: rows {bad[:8]} differ (err {err[bad[:4]].tolist()} > {bound[bad[:4]].tolist()})"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_float64_reference(impl, name, small_chunks, device):
    hidden, weight, b, targets, tok = branch_inputs()
    out, dh, dw, db = _call(impl, name, hidden, weight, b, targets, tok)
    tok64 = {k: v.double() for k, v in tok.items()}
    ref, rh, rw, rb = _call("naive", name, hidden.double(), weight.double(), b.double(), targets, tok64)
    assert torch.isfinite(ref.loss)
    assert_rel(out.loss, ref.loss, 1e-5, "loss")
    _assert_rows(dh, rh, 1e-4, "d_hidden")
    assert_rel(dw, rw, 1e-5, "d_weight")
    assert_rel(db, rb, 1e-5, "d_bias")
    assert out.metrics.keys() == ref.metrics.keys()
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].double().cpu(), ref.metrics[k].double().cpu(), rtol=1e-5,
                                   atol=1e-6, msg=f"metric {k}")
    assert_rel(out.logp, ref.logp, 5e-6, "logp")


def test_inputs_hit_every_branch(device):
    """Guards the test above against going vacuous if the input recipe drifts."""
    hidden, weight, b, targets, tok = branch_inputs()
    for name, key in [("trrd", "clip_frac_pos"), ("trrd", "clip_frac_neg"), ("trrd", "teacher_clamp_frac"),
                      ("trrd", "teacher_clamp_hi"), ("trrd", "teacher_clamp_lo"),
                      ("trrd_gated_straight_through", "teacher_gate_frac"),
                      ("trrd_gated_straight_through", "teacher_clamp_hi"),
                      ("trrd_gated_straight_through", "teacher_clamp_lo"),
                      ("arithmetic_gated_dual", "teacher_gate_frac"),
                      ("trrd_noclamp_dual", "dual_clip_frac"), ("kdrl_k3_dual", "dual_clip_frac")]:
        out, *_ = _call("naive", name, hidden.double(), weight.double(), b.double(), targets,
                        {k: v.double() for k, v in tok.items()})
        assert 0 < out.metrics[key] < 1, f"{name}: {key} = {out.metrics[key]}"
    assert out.metrics["ratio_mean"] > 1e6  # a capped ratio (e^20) is in there


TEACHER_METRICS = {"teacher_gap", "teacher_clamp_frac", "teacher_clamp_hi", "teacher_clamp_lo", "teacher_gate_frac"}
GATE = dict(teacher_align_threshold=1.0, teacher_adv_threshold=0.2)


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_teacher_metrics_only_where_the_teacher_acts(impl, small_chunks, device):
    """Teacher metrics need a teacher in the ratio (teacher_logp and alpha < 1); the clamp ones a
    geometric mixture with a clamp, the gate one a gate. GRPO and KDRL (alpha = 1) report none."""
    hidden, weight, b, targets, tok = branch_inputs(N=24, V=40, seed=23)
    gap, clamp, gate = {"teacher_gap"}, {"teacher_clamp_frac", "teacher_clamp_hi", "teacher_clamp_lo"}, {
        "teacher_gate_frac"}
    cases = [  # (config, teacher given, teacher metrics expected)
        (PolicyLossConfig(), False, set()),
        (PolicyLossConfig(**GATE), False, set()),
        (PolicyLossConfig(alpha=1.0, kd_estimator="k2", kd_coef=0.1), True, set()),
        (PolicyLossConfig(alpha=1.0, **GATE), True, set()),
        (PolicyLossConfig(), True, gap | clamp),
        (PolicyLossConfig(teacher_clamp=None), True, gap),
        (PolicyLossConfig(mixture="arithmetic"), True, gap),
        (PolicyLossConfig(**GATE), True, gap | clamp | gate),
        (PolicyLossConfig(mixture="arithmetic", teacher_adv_threshold=0.0), True, gap | gate),
    ]
    for cfg, teacher, want in cases:
        out = linear_policy_loss(hidden, weight, targets, tok["advantages"], tok["old_logp"],
                                 teacher_logp=tok["teacher_logp"] if teacher else None, bias=b, config=cfg, impl=impl)
        assert set(out.metrics) & TEACHER_METRICS == want, (cfg, teacher, sorted(out.metrics))
        if clamp <= want:
            m = out.metrics
            torch.testing.assert_close(m["teacher_clamp_frac"], m["teacher_clamp_hi"] + m["teacher_clamp_lo"])


@pytest.mark.parametrize("split", [1, 4])
def test_triton_split_vocab_policy(split, device):
    hidden, weight, b, targets, tok = branch_inputs(N=53, V=157, seed=3)
    with triton_config(split_v=split, scratch_bytes=1):
        out, dh, dw, db = _call("triton", "kdrl_k2_ref_ent", hidden, weight, b, targets, tok)
    ref, rh, rw, rb = _call("naive", "kdrl_k2_ref_ent", hidden.double(), weight.double(), b.double(), targets,
                            {k: v.double() for k, v in tok.items()})
    assert_rel(out.loss, ref.loss, 1e-5, "loss")
    _assert_rows(dh, rh, 1e-4, "d_hidden")
    assert_rel(dw, rw, 1e-5, "d_weight")


def test_torch_path_in_several_blocks(small_chunks, monkeypatch, device):
    """The torch policy path takes the tokens in [C, V] blocks sized by CHUNKS.block_bytes; several
    blocks (the last one ragged) give the one-block result."""
    hidden, weight, b, targets, tok = branch_inputs()
    rows = []
    tile = ScaledHead.tile
    monkeypatch.setattr(ScaledHead, "tile", lambda self, xs, s0, s1: rows.append(xs.shape[0]) or tile(self, xs, s0, s1))
    out, dh, dw, db = _call("torch", "kdrl_k2_ref_ent", hidden, weight, b, targets, tok)
    assert len(rows) >= 3 and rows[-1] < rows[0], rows
    monkeypatch.setattr(small_chunks, "block_bytes", 64 << 20)
    rows.clear()
    one, oh, ow, ob = _call("torch", "kdrl_k2_ref_ent", hidden, weight, b, targets, tok)
    assert len(rows) == 1
    # the same float32 values, summed in another order
    assert_rel(out.loss, one.loss, 1e-6, "loss")
    for name, a, e in (("d_hidden", dh, oh), ("d_weight", dw, ow), ("d_bias", db, ob)):
        assert_rel(a, e, 1e-6, name)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bfloat16_inputs(impl, small_chunks, device):
    hidden, weight, b, targets, tok = branch_inputs(dtype=torch.bfloat16, seed=5)
    out, dh, dw, db = _call(impl, "trrd", hidden, weight, b, targets, tok)
    ref, rh, rw, rb = _call("naive", "trrd", hidden.double(), weight.double(), b.double(), targets,
                            {k: v.double() for k, v in tok.items()})
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert_rel(out.loss, ref.loss, 1e-5, "loss")
    assert_rel(dh, rh, 1e-2, "d_hidden")
    assert_rel(dw, rw, 1e-2, "d_weight")


@pytest.mark.parametrize("impl", ["triton", "torch", "naive"])
def test_global_normalizer_across_micro_batches(impl, small_chunks, device):
    """Two micro-batches with the global token count as normalizer give the full batch's loss and
    gradient (gradient accumulation is exact)."""
    hidden, weight, b, targets, tok = branch_inputs(N=60, seed=7)
    cfg = CONFIGS["trrd"]

    def run(sl, normalizer, w):
        return linear_policy_loss(hidden[sl], w, targets[sl], tok["advantages"][sl], tok["old_logp"][sl],
                                  teacher_logp=tok["teacher_logp"][sl], token_weights=tok["token_weights"][sl],
                                  normalizer=normalizer, bias=b, config=cfg, impl=impl).loss

    w_full = weight.clone().requires_grad_()
    full = run(slice(None), None, w_full)
    full.backward()
    valid = targets != -100
    total = (tok["token_weights"] * valid).sum()
    w_acc = weight.clone().requires_grad_()
    acc = run(slice(0, 25), total, w_acc) + run(slice(25, None), total, w_acc)
    acc.backward()
    assert_rel(acc, full, 1e-6, "accumulated loss")
    assert_rel(w_acc.grad, w_full.grad, 1e-6, "accumulated d_weight")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_returned_logp_matches_linear_logprobs(impl, small_chunks, device):
    hidden, weight, b, targets, tok = branch_inputs(N=40, seed=9)
    out = linear_policy_loss(hidden, weight, targets, tok["advantages"], tok["old_logp"], bias=b, impl=impl)
    lp, ent = linear_logprobs(hidden, weight, targets, bias=b, return_entropy=True, impl=impl)
    # two float32 computations of the same values (the policy path may use another formula): ~1 ulp apart
    torch.testing.assert_close(out.logp, lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy, ent, rtol=1e-6, atol=1e-6)
    assert not out.logp.requires_grad


# ---------------------------------------------------------------- kd_estimator="full" (exact reverse KL)
def _teacher(N, V, Ht=27, Vt=None, seed=21, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ht = torch.randn(N, Ht, generator=g)
    wt = torch.randn(Vt or V + 6, Ht, generator=g) * (2.0 / Ht ** 0.5)
    bt = torch.randn(Vt or V + 6, generator=g) * 0.3
    return ht.to(device=device, dtype=dtype), wt.to(device=device, dtype=dtype), bt.to(device=device, dtype=dtype)


def test_full_kd_matches_hand_computation(device):
    """loss = TRRD part + kd_coef * sum_t w_t kd_t KL_t(p_s || p_t) / sum_t w_t, all in float64,
    with KL from materialized log-softmaxes (not from the library's divergence op)."""
    hidden, weight, b, targets, tok = branch_inputs(N=41, V=97, seed=13)
    ht, wt, bt = _teacher(41, 97, device=device)
    h64, w64, b64 = (x.double() for x in (hidden, weight, b))
    ht64, wt64, bt64 = (x.double() for x in (ht, wt, bt))
    T, V = 0.8, 97
    cfg = PolicyLossConfig(alpha=0.5, kd_estimator="full", kd_coef=0.3)
    h = h64.clone().requires_grad_()
    out = linear_policy_loss(h, w64, targets, tok["advantages"].double(), tok["old_logp"].double(),
                             token_weights=tok["token_weights"].double(), kd_weights=tok["kd_weights"].double(),
                             bias=b64, temperature=T, config=cfg, impl="naive", teacher_hidden=ht64,
                             teacher_weight=wt64, teacher_bias=bt64)
    out.loss.backward()
    # by hand
    hh = h64.clone().requires_grad_()
    ls = torch.log_softmax((hh @ w64.T + b64) / T, -1)
    lt = torch.log_softmax((ht64 @ wt64[:V].T + bt64[:V]) / T, -1)
    valid = targets != -100
    lp_t = lt.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
    base = linear_policy_loss(hh, w64, targets, tok["advantages"].double(), tok["old_logp"].double(),
                              teacher_logp=lp_t.detach(), token_weights=tok["token_weights"].double(), bias=b64,
                              temperature=T, config=PolicyLossConfig(alpha=0.5), impl="naive").loss
    kl = (ls.exp() * (ls - lt)).sum(-1)
    w = tok["token_weights"].double() * valid
    expected = base + 0.3 * (w * tok["kd_weights"].double() * kl).sum() / w.sum()
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.grad, hh.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.metrics["kd_mean"], kl[valid].mean().float(), rtol=1e-6, atol=0)
    assert out.metrics["teacher_gap"] != 0  # the ratio used the teacher log-probs derived from its hidden states


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_full_kd_impls_match_reference(impl, small_chunks, device):
    hidden, weight, b, targets, tok = branch_inputs(N=41, V=97, seed=15)
    ht, wt, bt = _teacher(41, 97, device=device)
    cfg = PolicyLossConfig(alpha=0.7, kd_estimator="full", kd_coef=0.5, entropy_coef=0.01)

    def run(impl_, cast):
        h = cast(hidden).clone().requires_grad_()
        w = cast(weight).clone().requires_grad_()
        out = linear_policy_loss(h, w, targets, cast(tok["advantages"]), cast(tok["old_logp"]),
                                 kd_weights=cast(tok["kd_weights"]), bias=cast(b), temperature=0.9, config=cfg,
                                 impl=impl_, teacher_hidden=cast(ht), teacher_weight=cast(wt), teacher_bias=cast(bt))
        out.loss.backward()
        return out, h.grad, w.grad

    out, dh, dw = run(impl, lambda x: x)
    ref, rh, rw = run("naive", lambda x: x.double())
    assert_rel(out.loss, ref.loss, 1e-5, "loss")
    _assert_rows(dh, rh, 1e-4, "d_hidden")
    assert_rel(dw, rw, 1e-5, "d_weight")
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].double(), ref.metrics[k].double(), rtol=1e-5, atol=1e-6)


def test_full_kd_errors(device):
    hidden, weight, b, targets, tok = branch_inputs(N=20, V=60, seed=17)
    ht, wt, bt = _teacher(20, 60, device=device)
    cfg = PolicyLossConfig(alpha=1.0, kd_estimator="full", kd_coef=0.1)
    args = (hidden, weight, targets, tok["advantages"], tok["old_logp"])
    with pytest.raises(ValueError, match="kd_estimator='full' needs teacher_hidden and teacher_head"):
        linear_policy_loss(*args, teacher_logp=tok["teacher_logp"], config=cfg)
    with pytest.raises(ValueError, match="pass teacher_hidden and teacher_head together"):
        linear_policy_loss(*args, teacher_hidden=ht, config=cfg)
    with pytest.raises(ValueError, match="teacher vocabulary \\(50\\) is smaller"):
        linear_policy_loss(*args, teacher_hidden=ht, teacher_weight=wt[:50], config=cfg)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        linear_policy_loss(*args, teacher_hidden=ht, teacher_weight=wt.clone().requires_grad_(), config=cfg)


def test_torch_backward_runs_once(device):
    """The torch policy path forms its gradients in the forward: a second backward of the same
    graph is refused rather than silently scaling them twice."""
    hidden, weight, b, targets, tok = branch_inputs(N=16, seed=19)
    w = weight.clone().requires_grad_()
    out = linear_policy_loss(hidden, w, targets, tok["advantages"], tok["old_logp"], impl="torch")
    (2.0 * out.loss).backward(retain_graph=True)
    w64 = weight.double().requires_grad_()
    ref = linear_policy_loss(hidden.double(), w64, targets, tok["advantages"].double(), tok["old_logp"].double(),
                             impl="naive")
    (2.0 * ref.loss).backward()
    assert_rel(w.grad, w64.grad, 1e-5, "d_weight scaled by the upstream gradient")
    with pytest.raises(RuntimeError, match="backward can run once per forward"):
        out.loss.backward()
