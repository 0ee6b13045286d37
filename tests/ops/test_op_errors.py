"""Bad input gets a clear error naming the argument; non-finite input never yields a finite loss;
degenerate batches (all tokens ignored, no tokens) give 0 without NaN."""

import subprocess
import sys

import pytest
import torch

from rlad_kernels import (
    LinearLogprobs,
    LinearPolicyLoss,
    PolicyLossConfig,
    linear_divergence,
    linear_logprobs,
    linear_policy_loss,
    triton_config,
)
from rlad_kernels.ops.common.normalizer import guard_normalizer

from helpers import kw_id, make_lm_inputs

IMPLS = ["triton", "torch", "naive"]
N, H, V = 12, 16, 40


@pytest.fixture
def inputs(device):
    hidden, weight, b, targets = make_lm_inputs(N, H, V, bias=True, seed=0)
    g = torch.Generator().manual_seed(1)
    tok = dict(advantages=torch.randn(N, generator=g).to(device), old_logp=-torch.rand(N, generator=g).to(device),
               teacher_logp=-torch.rand(N, generator=g).to(device))
    return hidden, weight, b, targets, tok


def policy(inputs, **kw):
    hidden, weight, b, targets, tok = inputs
    args = dict(hidden=hidden, weight=weight, targets=targets, advantages=tok["advantages"],
                old_logp=tok["old_logp"])
    args.update(kw)
    return linear_policy_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"),
                              args.pop("advantages"), args.pop("old_logp"), **args)


# ---------------------------------------------------------------- shapes, dtypes, devices
def test_targets_shape_mismatch(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(ValueError, match=r"targets has shape \(11,\) but hidden.shape\[:-1\] is \(12,\)"):
        linear_logprobs(hidden, weight, targets[:-1])


def test_weight_hidden_size_mismatch_hints_transpose(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(ValueError, match="hidden size 15 but hidden has 16"):
        linear_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="did you pass weight.T"):
        linear_logprobs(hidden, weight.T.contiguous(), targets)


def test_weight_and_bias_shapes(inputs):
    hidden, weight, b, targets, _ = inputs
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        linear_logprobs(hidden, weight[None], targets)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        linear_logprobs(hidden, weight, targets, bias=b[:-1])


def test_device_mismatch(inputs):
    hidden, weight, _, targets, tok = inputs
    with pytest.raises(ValueError, match="weight is on meta"):
        linear_logprobs(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="advantages is on meta"):
        policy(inputs, advantages=tok["advantages"].to("meta"))


def test_dtype_mismatch(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(TypeError, match=r"hidden is torch.float32 but weight is torch.float16"):
        linear_logprobs(hidden, weight.half(), targets)


def test_triton_rejects_float64(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(TypeError, match="impl='triton' supports float32/bfloat16/float16 hidden"):
        linear_logprobs(hidden.double(), weight.double(), targets, impl="triton")


def test_non_integer_targets(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        linear_logprobs(hidden, weight, targets > 3)


# On CUDA the range check is a device-side assert (no host sync in the hot path): it ends the CUDA
# context of the process it fires in, so it runs in a child process of its own there.
_ASSERT_CHILD = """
import sys, torch
from rlad_kernels import linear_logprobs
V, bad = int(sys.argv[1]), int(sys.argv[2])
hidden = torch.randn(12, 16, device="cuda")
weight = torch.randn(V, 16, device="cuda")
targets = torch.zeros(12, dtype=torch.long, device="cuda")
targets[4] = bad
linear_logprobs(hidden, weight, targets)
torch.cuda.synchronize()
print("no assert")
"""


@pytest.mark.parametrize("bad", [V, V + 7, -1, -101])
def test_targets_out_of_range(inputs, bad):
    hidden, weight, _, targets, _ = inputs
    t = targets.clone()
    t[4] = bad
    if hidden.is_cuda:
        proc = subprocess.run([sys.executable, "-c", _ASSERT_CHILD, str(V), str(bad)], capture_output=True,
                              text=True, timeout=300)
        # the assert fires at the sync (its message reaches stderr only where torch prints it)
        assert proc.returncode != 0 and "no assert" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]
    else:
        with pytest.raises(ValueError, match=rf"targets has ids outside \[0, {V}\).*first bad id: {bad}"):
            linear_logprobs(hidden, weight, t)
    # ignore_index itself is fine, whatever its value
    t[4] = -7
    t[t == -100] = -7
    linear_logprobs(hidden, weight, t, ignore_index=-7)


@pytest.mark.parametrize("name", ["old_logp", "teacher_logp", "advantages", "ref_logp", "token_weights"])
def test_constant_inputs_must_not_require_grad(inputs, name):
    t = inputs[4]["old_logp"].clone().requires_grad_()
    cfg = PolicyLossConfig(ref_kl_coef=0.1)
    kw = {name: t, "ref_logp": inputs[4]["old_logp"]} if name != "ref_logp" else {name: t}
    with pytest.raises(ValueError, match=rf"{name} requires grad.*pass {name}.detach\(\)"):
        policy(inputs, config=cfg, **kw)


def test_per_token_input_shape(inputs):
    with pytest.raises(ValueError, match=r"teacher_logp has shape \(6,\) but targets has shape \(12,\)"):
        policy(inputs, teacher_logp=inputs[4]["teacher_logp"][:6])


# ---------------------------------------------------------------- scalar options and config
@pytest.mark.parametrize("value,msg", [(0.0, "temperature must be > 0"), (-1.0, "temperature must be > 0"),
                                       (float("nan"), "temperature must be finite")])
def test_bad_temperature(inputs, value, msg):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(ValueError, match=msg):
        linear_logprobs(hidden, weight, targets, temperature=value)
    with pytest.raises(ValueError, match=msg):
        LinearLogprobs(temperature=value)


def test_bad_logit_scale(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        linear_logprobs(hidden, weight, targets, logit_scale=0.0)


@pytest.mark.parametrize("kw,msg", [
    (dict(alpha=1.5), r"alpha must be <= 1.0"),
    (dict(alpha=-0.1), r"alpha must be >= 0.0"),
    (dict(eps_low=-0.1), r"eps_low must be >= 0.0"),
    (dict(eps_low=1.0), r"eps_low must be < 1.0"),
    (dict(eps_high=-0.2), r"eps_high must be >= 0.0"),
    (dict(teacher_clamp=0.0), r"teacher_clamp must be > 0"),
    (dict(dual_clip=1.0), r"dual_clip must be > 1.0"),
    (dict(teacher_clamp_grad="identity"), r"unknown PolicyLossConfig.teacher_clamp_grad 'identity'"),
    (dict(teacher_align_threshold=0.0), r"teacher_align_threshold must be > 0"),
    (dict(teacher_align_threshold=float("inf")), r"teacher_align_threshold must be finite"),
    (dict(teacher_adv_threshold=-0.1), r"teacher_adv_threshold must be >= 0.0"),
    (dict(teacher_adv_threshold=float("nan")), r"teacher_adv_threshold must be finite"),
    (dict(mixture="harmonic"), r"unknown PolicyLossConfig.mixture 'harmonic'"),
    (dict(kd_estimator="k4"), r"unknown PolicyLossConfig.kd_estimator 'k4'"),
    (dict(kd_coef=-1.0), r"kd_coef must be >= 0.0"),
    (dict(alpha="0.5"), r"alpha must be a Python int or float"),
], ids=kw_id)
def test_bad_config(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        PolicyLossConfig(**kw)


def test_unknown_impl(inputs):
    hidden, weight, _, targets, _ = inputs
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        linear_logprobs(hidden, weight, targets, impl="cuda")


def test_triton_on_cpu_without_interpreter(inputs, monkeypatch):
    hidden, weight, _, targets, _ = inputs
    if hidden.is_cuda:
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors.*impl='torch'"):
        linear_logprobs(hidden, weight, targets, impl="triton")


def test_kd_without_teacher(inputs):
    with pytest.raises(ValueError, match="kd_estimator='k2' needs teacher_logp"):
        policy(inputs, config=PolicyLossConfig(alpha=1.0, kd_estimator="k2", kd_coef=0.1))


def test_ref_kl_without_ref_logp(inputs):
    with pytest.raises(ValueError, match="ref_kl_coef=0.1 needs ref_logp"):
        policy(inputs, config=PolicyLossConfig(ref_kl_coef=0.1))


def test_kd_weights_without_estimator(inputs):
    with pytest.raises(ValueError, match="kd_weights given but kd_estimator is None"):
        policy(inputs, kd_weights=torch.ones_like(inputs[4]["advantages"]))


def test_bad_normalizer(inputs):
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        policy(inputs, normalizer=0)
    with pytest.raises(ValueError, match="normalizer must be a number or a 1-element float tensor"):
        policy(inputs, normalizer=torch.ones(2))


@pytest.mark.parametrize("value", [0.0, -3.0, float("nan"), float("inf"), -float("inf")])
def test_normalizer_tensor_must_be_finite_and_positive(inputs, value):
    """A negative normalizer would flip the loss's sign, zero or NaN would hide in a division: on
    the CPU the tensor is checked and refused; on an accelerator (no host sync) it becomes NaN."""
    hidden = inputs[0]
    norm = torch.tensor(value, device=hidden.device)
    if hidden.device.type == "cpu":
        with pytest.raises(ValueError, match="normalizer must be finite and > 0"):
            policy(inputs, normalizer=norm)
        with pytest.raises(ValueError, match="normalizer must be finite and > 0"):
            linear_divergence(hidden, inputs[1], hidden, inputs[1], normalizer=norm)
    else:
        assert torch.isnan(policy(inputs, normalizer=norm).loss)
    guarded = guard_normalizer(torch.tensor([value, 2.5]))
    assert torch.isnan(guarded[0]) and guarded[1] == 2.5


# op -> f(hidden, weight, targets, teacher_hidden, impl), a scalar
ONCE = {
    "logprobs": lambda h, w, y, ht, impl: linear_logprobs(h, w, y, impl=impl).sum(),
    "logprobs+entropy": lambda h, w, y, ht, impl: sum(t.sum() for t in linear_logprobs(h, w, y, return_entropy=True,
                                                                                       impl=impl)),
    "policy": lambda h, w, y, ht, impl: linear_policy_loss(h, w, y, torch.ones_like(y, dtype=h.dtype),
                                                           torch.full_like(y, -1.0, dtype=h.dtype), impl=impl).loss,
    "jsd": lambda h, w, y, ht, impl: linear_divergence(h, w, ht, w.detach(), kind="jsd", impl=impl),
}


@pytest.mark.parametrize("op", list(ONCE))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_double_backward_is_refused_clearly(inputs, op, impl):
    """The fused backwards are not differentiable: a second derivative raises instead of coming out
    wrong (impl="naive" differentiates twice through materialized logits)."""
    hidden, weight, _, targets, _ = inputs
    h = hidden.clone().requires_grad_()
    (g,) = torch.autograd.grad(ONCE[op](h, weight, targets, 0.5 * hidden, impl), h, create_graph=True)
    with pytest.raises(RuntimeError, match=r"computes first derivatives only .* needs impl='naive'"):
        g.square().sum().backward()
    # without create_graph the first derivative is plain, as before
    (g,) = torch.autograd.grad(ONCE[op](h, weight, targets, 0.5 * hidden, impl), h)
    assert not g.requires_grad and torch.isfinite(g).all()


@pytest.mark.parametrize("op", list(ONCE))
def test_naive_double_backward_is_exact(inputs, op):
    hidden, weight, _, targets, _ = inputs
    h = hidden.double().clone().requires_grad_()
    w, ht = weight.double(), 0.5 * hidden.double()
    assert torch.autograd.gradgradcheck(lambda x: ONCE[op](x, w, targets, ht, "naive"), (h,))


def test_config_type(inputs):
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig"):
        policy(inputs, config={"alpha": 0.5})


# ---------------------------------------------------------------- non-finite inputs and degenerate batches
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["hidden", "weight", "advantages", "old_logp", "teacher_logp"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss(inputs, impl, where, value):
    hidden, weight, b, targets, tok = [x.clone() if torch.is_tensor(x) else dict(x) for x in inputs]
    valid = (targets != -100).nonzero().flatten()
    i = valid[0].item()
    if where == "hidden":
        hidden[i, 3] = value
    elif where == "weight":
        weight[targets[i], 2] = value
    else:
        tok[where] = tok[where].clone()
        tok[where][i] = value
    out = linear_policy_loss(hidden, weight, targets, tok["advantages"], tok["old_logp"],
                             teacher_logp=tok["teacher_logp"], impl=impl)
    assert not torch.isfinite(out.loss), f"{where}={value} gave finite loss {out.loss}"


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_logits_give_non_finite_logprobs(inputs, impl):
    hidden, weight, _, targets, _ = inputs
    h = hidden.clone()
    valid = (targets != -100).nonzero().flatten()
    h[valid[1], 0] = float("nan")
    lp, ent = linear_logprobs(h, weight, targets, return_entropy=True, impl=impl)
    assert torch.isnan(lp[valid[1]]) and torch.isnan(ent[valid[1]])
    assert torch.isfinite(lp[valid[0]])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_ignored(inputs, impl):
    hidden, weight, b, _, tok = inputs
    targets = torch.full((N,), -100, device=hidden.device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    cfg = PolicyLossConfig(entropy_coef=0.01)
    out = linear_policy_loss(h, w, targets, tok["advantages"], tok["old_logp"], teacher_logp=tok["teacher_logp"],
                             bias=bb, config=cfg, impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0.0
    for name, t in (("hidden", h), ("weight", w), ("bias", bb)):
        assert torch.all(t.grad == 0), f"d_{name} not zero"
    for k, v in out.metrics.items():
        assert torch.isfinite(v), k
    lp = linear_logprobs(h, w, targets, impl=impl)
    assert torch.all(lp == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(inputs, impl):
    hidden, weight, _, targets, tok = inputs
    w = weight.clone().requires_grad_()
    out = linear_policy_loss(hidden[:0], w, targets[:0], tok["advantages"][:0], tok["old_logp"][:0], impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(w.grad == 0)


def test_module_wrappers(inputs):
    hidden, weight, b, targets, tok = inputs
    mod = LinearPolicyLoss(PolicyLossConfig(alpha=0.25), temperature=0.9, impl="torch")
    out = mod(hidden, weight, targets, tok["advantages"], tok["old_logp"], teacher_logp=tok["teacher_logp"])
    ref = linear_policy_loss(hidden, weight, targets, tok["advantages"], tok["old_logp"],
                             teacher_logp=tok["teacher_logp"], temperature=0.9,
                             config=PolicyLossConfig(alpha=0.25), impl="torch")
    assert torch.equal(out.loss, ref.loss)
    lp = LinearLogprobs(temperature=0.9, impl="torch")(hidden, weight, targets)
    assert torch.equal(lp, linear_logprobs(hidden, weight, targets, temperature=0.9, impl="torch"))
    assert "alpha=0.25" in repr(mod)


def test_policy_module_passes_every_tensor_argument(inputs):
    """The module's forward takes every tensor keyword of linear_policy_loss (the teacher's hidden
    states and head included) and refuses the settings it stores."""
    hidden, weight, b, targets, tok = inputs
    g = torch.Generator().manual_seed(7)
    ht = torch.randn(N, 24, generator=g).to(hidden.device)
    wt = (torch.randn(V + 3, 24, generator=g) * 0.3).to(hidden.device)
    bt = torch.randn(V + 3, generator=g).to(hidden.device)
    cfg = PolicyLossConfig(alpha=1.0, kd_estimator="full", kd_coef=0.3)
    tensors = dict(teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt, bias=b,
                   token_weights=torch.rand(N, generator=g).to(hidden.device) + 0.5,
                   kd_weights=(torch.rand(N, generator=g) > 0.5).float().to(hidden.device), normalizer=7.0)
    mod = LinearPolicyLoss(cfg, temperature=0.8, impl="torch")
    out = mod(hidden, weight, targets, tok["advantages"], tok["old_logp"], **tensors)
    ref = linear_policy_loss(hidden, weight, targets, tok["advantages"], tok["old_logp"], temperature=0.8,
                             config=cfg, impl="torch", **tensors)
    assert torch.equal(out.loss, ref.loss) and out.metrics.keys() == ref.metrics.keys()
    assert out.metrics["kd_mean"] > 0  # the teacher's hidden states were used
    with pytest.raises(TypeError, match=r"\['temperature'\] are settings of the module"):
        mod(hidden, weight, targets, tok["advantages"], tok["old_logp"], temperature=1.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        mod(hidden, weight, targets, tok["advantages"], tok["old_logp"], teacher_logits=ht)


@pytest.mark.parametrize("impl", IMPLS)
def test_garbage_in_ignored_positions_is_ignored(inputs, impl):
    """Padding positions may hold anything in the per-token inputs: they are skipped, not summed."""
    hidden, weight, b, targets, tok = inputs
    ignored = targets == -100
    assert ignored.any()
    dirty = {k: torch.where(ignored, torch.full_like(v, float("nan")), v) for k, v in tok.items()}
    w1 = weight.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    cfg = PolicyLossConfig(alpha=1.0, kd_estimator="k3", kd_coef=0.1)
    clean = linear_policy_loss(hidden, w1, targets, tok["advantages"], tok["old_logp"],
                               teacher_logp=tok["teacher_logp"], config=cfg, impl=impl)
    noisy = linear_policy_loss(hidden, w2, targets, dirty["advantages"], dirty["old_logp"],
                               teacher_logp=dirty["teacher_logp"], kd_weights=torch.where(
                                   ignored, float("inf"), 1.0), config=cfg, impl=impl)
    clean.loss.backward()
    noisy.loss.backward()
    assert torch.isfinite(noisy.loss) and torch.equal(clean.loss, noisy.loss)
    assert torch.equal(w1.grad, w2.grad)


@pytest.mark.parametrize("dw_split_k", [1, 3], ids=["one-split", "three-splits"])
@pytest.mark.parametrize("op", ["logprobs", "policy", "divergence"])
@pytest.mark.parametrize("impl", IMPLS)
def test_garbage_in_ignored_hidden_rows_never_reaches_the_gradients(inputs, impl, op, dw_split_k):
    """NaN / inf in the hidden state of an ignored (or masked) row (padding under some attention
    implementations) changes nothing: not the loss, not dW or db, not the other rows' dX; the
    ignored rows' dX is 0. The Triton path reads X through the row mask in its dW GEMM, also
    when the rows are split across programs."""
    hidden, weight, b, targets, tok = inputs
    ignored = targets == -100
    dirty = hidden.clone()
    dirty[ignored.nonzero()[0, 0]] = float("nan")
    dirty[ignored.nonzero()[-1, 0]] = float("inf")

    def run(h):
        h = h.clone().requires_grad_()
        w, bb = weight.clone().requires_grad_(), b.clone().requires_grad_()
        if op == "logprobs":
            lp, ent = linear_logprobs(h, w, targets, bias=bb, return_entropy=True, impl=impl)
            loss = lp.sum() + ent.sum()
        elif op == "policy":
            loss = linear_policy_loss(h, w, targets, tok["advantages"], tok["old_logp"], bias=bb,
                                      teacher_logp=tok["teacher_logp"], impl=impl).loss
        else:
            loss = linear_divergence(h, w, hidden.detach() * 0.5, weight.detach(), student_bias=bb, mask=~ignored,
                                     kind="jsd", impl=impl)
        loss.backward()
        return loss.detach(), h.grad, w.grad, bb.grad

    with triton_config(dw_split_k=dw_split_k):
        clean, noisy = run(hidden), run(dirty)
    for name, a, c in zip(("loss", "d_hidden", "d_weight", "d_bias"), noisy, clean, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7, msg=name)
    assert (noisy[1][ignored] == 0).all()
