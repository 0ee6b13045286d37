"""The calls of the public ops whose launches the compile report records: per group (``standard``,
``epilogue``, ``autotune``), name -> (dtype name, a thunk running the forward and the backward).
Every call passes the lm_head as an ``LMHead`` and the policy loss's per-token inputs as one
``TokenInputs``."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(dt: torch.dtype, N: int, H: int, V: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, H, dtype=dt).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H, dtype=dt).normal_(generator=g).mul_(0.02).requires_grad_()
    return dict(x=x, w=w, b=torch.zeros(V, dtype=dt, requires_grad=True),
                xt=torch.empty(N, H + 256, dtype=dt).normal_(generator=g),
                wt=torch.empty(V + 64, H + 256, dtype=dt).normal_(generator=g),
                bt=torch.zeros(V + 64, dtype=dt), y=torch.randint(0, V, (N,), generator=g),
                adv=torch.randn(N, generator=g), old=torch.full((N,), -2.0), tea=torch.full((N,), -2.5),
                ref=torch.full((N,), -2.2), tw=torch.rand(N, generator=g), kdw=torch.ones(N))


def _backward(fn):
    """``fn`` and the backward of what it returns: every launch of the forward and the backward."""
    def run():
        out = fn()
        out = sum(o.sum() for o in out) if isinstance(out, tuple) else out
        if out.requires_grad:
            out.sum().backward()
    return run


def _split(fn):
    """Run ``fn`` (forward and backward) with the vocabulary split across programs (what small N
    does on a GPU) and the dW GEMM's rows split too."""
    import rlad_kernels as rk

    def run():
        with rk.triton_config(split_v=4, dw_split_k=3):
            return _backward(fn)()
    return run


# the policy epilogue's covering set: (config kwargs, per-token inputs given, bias)
EPILOGUE_CASES = {
    "grpo": (dict(), (), False),
    "grpo+dual+ref+weights": (dict(dual_clip=3.0, ref_kl_coef=0.1), ("ref", "tw"), True),
    "trrd-geometric-clamp": (dict(), ("tea",), False),
    "trrd-geometric-noclamp+entropy-bonus": (dict(teacher_clamp=None, entropy_coef=0.01), ("tea", "tw"), True),
    "trrd-arithmetic+dual": (dict(mixture="arithmetic", dual_clip=2.0), ("tea",), False),
    "kdrl-k1+kdw-noentropy": (dict(alpha=1.0, kd_estimator="k1", kd_coef=0.1, compute_entropy=False), ("tea", "kdw"),
                              False),
    "kdrl-k2+ref": (dict(alpha=1.0, kd_estimator="k2", kd_coef=0.1, ref_kl_coef=0.1), ("tea", "ref"), True),
    "kdrl-k3+kdw+weights": (dict(alpha=1.0, kd_estimator="k3", kd_coef=0.1), ("tea", "kdw", "tw"), False),
    "trrd-arithmetic+k3+entropy-bonus": (dict(mixture="arithmetic", kd_estimator="k3", kd_coef=0.1,
                                              entropy_coef=0.01), ("tea",), False),
    "trrd-arithmetic+gate": (dict(mixture="arithmetic", teacher_align_threshold=1.0), ("tea",), False),
    "cispo-trrd+gate+ref+k2": (dict(objective="cispo", teacher_align_threshold=1.0, ref_kl_coef=0.1,
                                    kd_estimator="k2", kd_coef=0.1), ("tea", "ref", "tw"), True),
    "cispo+entropy-token-mean": (dict(objective="cispo", entropy_coef=0.01, entropy_aggregation="token_mean"),
                                 ("tw",), False),
    "everything": (dict(dual_clip=3.0, kd_estimator="k2", kd_coef=0.1, ref_kl_coef=0.1, entropy_coef=0.01,
                        teacher_align_threshold=1.0, teacher_adv_threshold=0.1, teacher_clamp_grad="straight_through"),
                   ("tea", "ref", "tw", "kdw"), True),
}
_KW = dict(tea="teacher_logp", ref="ref_logp", tw="token_weights", kdw="kd_weights")


def _policy(t: dict, cfg_kw: dict, given, bias: bool, softcap: float | None = None):
    import rlad_kernels as rk

    head = rk.LMHead(t["w"], bias=t["b"] if bias else None, softcap=softcap)
    tok = rk.TokenInputs(advantages=t["adv"], old_logp=t["old"], **{_KW[k]: t[k] for k in given})
    return lambda: rk.linear_policy_loss(t["x"], head, t["y"], tok, config=rk.PolicyLossConfig(**cfg_kw),
                                         impl="triton").loss


def variants(groups, dtypes, shape, arch: int) -> dict:
    """name -> (dtype name, thunk) for every public-op call of the chosen groups; each thunk runs
    the forward and the backward."""
    import rlad_kernels as rk

    N, H, V = shape
    calls = {}
    if "standard" in groups:
        for dn in dtypes:
            t = _inputs(DTYPES[dn], N, H, V)
            x, y = t["x"], t["y"]
            head, biased = rk.LMHead(t["w"]), rk.LMHead(t["w"], bias=t["b"])
            capped = rk.LMHead(t["w"], bias=t["b"], softcap=30.0)
            calls[f"{dn} logprobs"] = (dn, _backward(lambda x=x, h=head, y=y: rk.linear_logprobs(
                x, h, y, impl="triton")))
            calls[f"{dn} logprobs+bias+entropy"] = (dn, _backward(lambda x=x, h=biased, y=y: rk.linear_logprobs(
                x, h, y, return_entropy=True, impl="triton")))
            calls[f"{dn} logprobs split"] = (dn, _split(lambda x=x, h=head, y=y: rk.linear_logprobs(
                x, h, y, return_entropy=True, impl="triton")))
            calls[f"{dn} logprobs+bias+entropy+softcap"] = (dn, _backward(lambda x=x, h=capped, y=y: rk.linear_logprobs(
                x, h, y, return_entropy=True, impl="triton")))
            heavy = EPILOGUE_CASES["everything"]
            calls[f"{dn} policy everything"] = (dn, _backward(_policy(t, *heavy)))
            calls[f"{dn} policy everything+softcap"] = (dn, _backward(_policy(t, *heavy, softcap=30.0)))
            calls[f"{dn} policy everything split"] = (dn, _split(_policy(t, *heavy)))
            teacher, teacher_biased = rk.LMHead(t["wt"]), rk.LMHead(t["wt"], bias=t["bt"])
            student_capped, teacher_capped = rk.LMHead(t["w"], softcap=30.0), rk.LMHead(t["wt"], softcap=50.0)
            for kind in ("reverse_kl", "forward_kl", "jsd"):
                calls[f"{dn} divergence {kind}"] = (dn, _backward(
                    lambda t=t, kind=kind, s=head, te=teacher: rk.linear_divergence(
                        t["x"], s, t["xt"], te, kind=kind, impl="triton")))
                calls[f"{dn} divergence {kind} split+bias"] = (dn, _split(
                    lambda t=t, kind=kind, s=biased, te=teacher_biased: rk.linear_divergence(
                        t["x"], s, t["xt"], te, kind=kind, impl="triton")))
                calls[f"{dn} divergence {kind} softcaps"] = (dn, _backward(
                    lambda t=t, kind=kind, s=student_capped, te=teacher_capped: rk.linear_divergence(
                        t["x"], s, t["xt"], te, kind=kind, impl="triton")))
    if "epilogue" in groups:
        t = _inputs(torch.bfloat16, N, H, V)
        for name, case in EPILOGUE_CASES.items():
            calls[f"bf16 policy {name}"] = ("bf16", _backward(_policy(t, *case)))
        calls["bf16 policy everything split"] = ("bf16", _split(_policy(t, *EPILOGUE_CASES["everything"])))
    if "autotune" in groups:  # every candidate of the family's space, with the heaviest launches
        from rlad_kernels.ops.common.launch import AUTOTUNE_SPACE

        for dn in dtypes:
            t = _inputs(DTYPES[dn], N, H, V)
            student, teacher = rk.LMHead(t["w"]), rk.LMHead(t["wt"])
            for i, cand in enumerate(AUTOTUNE_SPACE[(arch, dn == "fp32")]):
                def run(t=t, cand=cand, student=student, teacher=teacher):
                    with rk.triton_config(**cand):
                        _backward(_policy(t, *EPILOGUE_CASES["everything"]))()
                        _backward(lambda: rk.linear_divergence(t["x"], student, t["xt"], teacher, kind="jsd",
                                                               impl="triton"))()
                calls[f"{dn} autotune[{i}] {cand}"] = (dn, run)
    return calls

