"""Providers: the same loss computed by ours and by what users run today.

Each provider builds, from the inputs, a closure that returns a scalar loss with grad enabled.
Baselines are imported from their packages, never re-typed; the eager reference is the
textbook materialized-logits computation (logits in the model dtype, then float32). Ours take the
lm_head as an ``LMHead`` and the policy loss's per-token inputs as one ``TokenInputs``, both made
when the closure is, so a timed call does the op's work only.
"""

from __future__ import annotations

import functools

import torch

from rlad_kernels import (
    LMHead,
    PolicyLossConfig,
    TokenInputs,
    linear_divergence,
    linear_logprobs,
    linear_policy_loss,
)
from rlad_kernels.utils.dispatch import triton_interpreting

from .harness import Provider, Unavailable

ALPHA, EPS, CLAMP, TEMP = 0.5, 0.2, 1.0, 1.0
TRRD = PolicyLossConfig(alpha=ALPHA, eps_low=EPS, eps_high=EPS, teacher_clamp=CLAMP, compute_entropy=False)


def _needs_cuda(x: torch.Tensor, what: str) -> None:
    if x.device.type != "cuda" and not triton_interpreting():
        raise Unavailable(f"{what}: CUDA only")


def _compiled(fn):
    """``torch.compile(fn, dynamic=False)``: it compiles again for every shape of a sweep, so the
    recompile limit is raised (past it, torch would fall back to eager silently)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover - depends on the toolchain
        raise Unavailable(f"torch.compile unavailable: {e}") from e


def _liger(name: str):
    try:
        import liger_kernel.chunked_loss as cl
        import liger_kernel.transformers as lt
    except ImportError as e:
        raise Unavailable(f"liger-kernel not installed ({e}); pip install liger-kernel") from e
    return getattr(cl, name, None) or getattr(lt, name)


def _batched(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N, ...] -> [N / seq_len, seq_len, ...] for providers that take sequences."""
    T = min(seq_len, x.shape[0])
    if x.shape[0] % T:
        raise Unavailable(f"N={x.shape[0]} is not a multiple of the sequence length {T}")
    return x.reshape(x.shape[0] // T, T, *x.shape[1:])


def _gemm_6nhv(x):
    """The speed of light of any loss on the lm_head: its three GEMMs in the inputs' dtype, timed
    as one piece of work (logits Z = X W^T, then dX = dZ W and dW = dZ^T X with dZ of Z's shape),
    outputs preallocated. 6NHV FLOPs, nothing else."""
    h, w = x["hidden"].detach(), x["weight"].detach()
    z = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    dx, dw = torch.empty_like(h), torch.empty_like(w)

    def run():
        torch.matmul(h, w.T, out=z)
        torch.matmul(z, w, out=dx)
        torch.matmul(z.T, h, out=dw)
    return run


GEMM = dict(name="gemm-6nhv", make=_gemm_6nhv, note="speed of light: the 3 GEMMs (X W^T, dZ W, dZ^T X), nothing else",
            leaves=[], backward=False)


def _cce_module():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut-cross-entropy not installed ({e}); pip install cut-cross-entropy") from e
    return linear_cross_entropy


def _cce_ce(x):
    """Cut Cross-Entropy's mean cross-entropy, fwd+bwd: one head, no policy epilogue (a floor)."""
    _needs_cuda(x["hidden"], "Cut Cross-Entropy's kernel")
    lce = _cce_module()
    return lambda: lce(x["hidden"], x["weight"], x["targets"])


# ------------------------------------------------------------------------------------ policy
def _eager_trrd(hidden, weight, targets, adv, old, teacher):
    logits = (hidden @ weight.T).float() / TEMP
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    d = torch.clamp(lp - teacher, -CLAMP, CLAMP)
    r = torch.exp(ALPHA * (lp - old) + (1 - ALPHA) * d)
    loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - EPS, 1 + EPS))
    return loss.mean()


def policy_providers(seq_len: int) -> list[Provider]:
    def ours(impl):
        def make(x):
            if impl == "triton":
                _needs_cuda(x["hidden"], "Triton kernels")
            head = LMHead(x["weight"])
            tok = TokenInputs(advantages=x["advantages"], old_logp=x["old_logp"], teacher_logp=x["teacher_logp"])
            return lambda: linear_policy_loss(x["hidden"], head, x["targets"], tok, temperature=TEMP, config=TRRD,
                                              impl=impl).loss
        return make

    def eager(compiled):
        def make(x):
            fn = _compiled(_eager_trrd) if compiled else _eager_trrd
            return lambda: fn(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logp"], x["teacher_logp"])
        return make

    def liger(anchor_teacher):
        def make(x):
            cls = _liger("LigerFusedLinearGRPOLoss")
            loss_fn = cls(beta=0.0, use_ref_model=False, epsilon_low=EPS, epsilon_high=EPS, loss_type="dapo",
                          temperature=TEMP)
            h, ids = _batched(x["hidden"], seq_len), _batched(x["targets"], seq_len)
            old = x["old_logp"]
            if anchor_teacher:  # TRRD's anchor as "old" log-probs: a lp_old + (1 - a) lp_T (no clamp possible)
                old = ALPHA * x["old_logp"] + (1 - ALPHA) * x["teacher_logp"]
            old = _batched(old, seq_len)
            adv = _batched(x["advantages"], seq_len)[:, 0].contiguous()  # Liger takes one advantage per sequence
            mask = torch.ones_like(ids, dtype=torch.float32)
            return lambda: loss_fn(h, x["weight"], ids, mask, adv, old_per_token_logps=old)[0]
        return make

    return [
        Provider("rlad-triton", ours("triton"), "TRRD, teacher clamp 1.0", exact=True),
        Provider("rlad-torch", ours("torch"), "TRRD, vocab-chunked torch", grads_in_forward=True, exact=True),
        Provider("eager", eager(False), "materialized logits", exact=True),
        Provider("torch.compile", eager(True), "compiled eager", exact=True),
        Provider("liger-grpo", liger(False), "LigerFusedLinearGRPOLoss, GRPO", grads_in_forward=True),
        Provider("liger-trrd-noclamp", liger(True), "Liger GRPO with the TRRD anchor as old log-probs; "
                 "no teacher clamp", grads_in_forward=True),
        Provider("cce-ce", _cce_ce, "Cut Cross-Entropy mean CE fwd+bwd: one head, no policy math (a floor)"),
        Provider(**GEMM),
    ]


# ------------------------------------------------------------------------------------ logprobs
def _eager_logprobs(hidden, weight, targets, g1, g2):
    logits = (hidden @ weight.T).float() / TEMP
    logp_all = torch.log_softmax(logits, dim=-1)
    lp = logp_all.gather(-1, targets[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return (lp * g1).sum() + (ent * g2).sum()


def logprob_providers(seq_len: int) -> list[Provider]:
    def upstream(x):
        gen = torch.Generator().manual_seed(1)
        n = x["hidden"].shape[0]
        dev = x["hidden"].device
        return torch.randn(n, generator=gen).to(dev), torch.randn(n, generator=gen).to(dev)

    def ours(impl):
        def make(x):
            if impl == "triton":
                _needs_cuda(x["hidden"], "Triton kernels")
            g1, g2 = upstream(x)
            head = LMHead(x["weight"])

            def run():
                lp, ent = linear_logprobs(x["hidden"], head, x["targets"], temperature=TEMP, return_entropy=True,
                                          impl=impl)
                return (lp * g1).sum() + (ent * g2).sum()
            return run
        return make

    def eager(compiled):
        def make(x):
            g1, g2 = upstream(x)
            fn = _compiled(_eager_logprobs) if compiled else _eager_logprobs
            return lambda: fn(x["hidden"], x["weight"], x["targets"], g1, g2)
        return make

    def cce(x):
        _needs_cuda(x["hidden"], "Cut Cross-Entropy's kernel")
        linear_cross_entropy = _cce_module()
        g1, _ = upstream(x)
        return lambda: (-linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none") * g1).sum()

    def liger_flce(x):
        _needs_cuda(x["hidden"], "Liger's fused linear cross-entropy kernel")
        loss_fn = _liger("LigerFusedLinearCrossEntropyLoss")(reduction="none")
        g1, _ = upstream(x)
        return lambda: (-loss_fn(x["weight"], x["hidden"], x["targets"]) * g1).sum()

    return [
        Provider("rlad-triton", ours("triton"), "log-prob + entropy", exact=True),
        Provider("rlad-torch", ours("torch"), "log-prob + entropy, vocab-chunked torch", exact=True),
        Provider("eager", eager(False), "log-prob + entropy, materialized logits", exact=True),
        Provider("torch.compile", eager(True), "log-prob + entropy, compiled eager", exact=True),
        Provider("cce", cce, "Cut Cross-Entropy reduction='none': log-prob only (no entropy)"),
        Provider("liger-flce", liger_flce, "Liger fused linear CE reduction='none': log-prob only (no entropy)"),
        Provider(**GEMM),
    ]


# ------------------------------------------------------------------------------------ divergence
BETA = 0.5


def _eager_jsd(hs, ws, ht, wt):
    ls = torch.log_softmax((hs @ ws.T).float() / TEMP, -1)
    lt = torch.log_softmax((ht @ wt.T).float() / TEMP, -1)
    lm = torch.logsumexp(torch.stack([lt + torch.log(torch.tensor(BETA)), ls + torch.log(torch.tensor(1 - BETA))]), 0)
    kl_t = (lt.exp() * (lt - lm)).sum(-1)
    kl_s = (ls.exp() * (ls - lm)).sum(-1)
    return (BETA * kl_t + (1 - BETA) * kl_s).mean()


def divergence_providers(seq_len: int) -> list[Provider]:
    def ours(impl):
        def make(x):
            if impl == "triton":
                _needs_cuda(x["hidden"], "Triton kernels")
            student, teacher = LMHead(x["weight"]), LMHead(x["teacher_weight"])
            return lambda: linear_divergence(x["hidden"], student, x["teacher_hidden"], teacher, kind="jsd", beta=BETA,
                                             temperature=TEMP, impl=impl)
        return make

    def eager(compiled):
        def make(x):
            fn = _compiled(_eager_jsd) if compiled else _eager_jsd
            return lambda: fn(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])
        return make

    def liger(x):
        loss_fn = _liger("LigerFusedLinearJSDLoss")(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                                   temperature=TEMP)
        return lambda: loss_fn(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["targets"])

    return [
        Provider("rlad-triton", ours("triton"), f"generalized JSD beta={BETA}", exact=True),
        Provider("rlad-torch", ours("torch"), f"generalized JSD beta={BETA}, vocab-chunked torch", exact=True),
        Provider("eager", eager(False), "materialized logits", exact=True),
        Provider("torch.compile", eager(True), "compiled eager", exact=True),
        Provider("liger-jsd", liger, f"LigerFusedLinearJSDLoss beta={BETA}, soft loss only", grads_in_forward=True),
    ]


PROVIDERS = {"policy": policy_providers, "logprobs": logprob_providers, "divergence": divergence_providers}


@functools.cache
def provider_names(op: str) -> dict[str, str]:
    return {p.name: p.note for p in PROVIDERS[op](1024)}
