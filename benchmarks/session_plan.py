"""The GPU session's plan: its providers and shapes (on the GPU, and for ``--dry-run`` on a CPU),
each benchmark step's share of the time left, and the order of the steps."""

from __future__ import annotations

OURS = "rlad-triton"
GEMM = "gemm-6nhv"

PROVIDERS = {
    "policy": [OURS, GEMM, "cce-ce", "liger-grpo", "eager", "torch.compile"],
    "logprobs": [OURS, GEMM, "cce", "liger-flce", "eager", "torch.compile"],
    "divergence": [OURS, "liger-jsd", "eager", "torch.compile"],
}
# the shapes: the performance bar's (README.md) first, then more while time remains
GPU = dict(H=4096, H_t=5120, dtype="bf16", seq_len=1024, core_V=151936, core_N=[8192, 32768], more_N=[16384, 65536],
           more_V=128256, more_V_N=[8192, 32768], tests=["tests/ops"], tests_s=150.0, budget_s=540.0,
           providers=PROVIDERS, first_guess_s={"torch.compile": 60.0, "default": 25.0})
DRY = dict(H=32, H_t=48, dtype="fp32", seq_len=16, core_V=256, core_N=[32, 48], more_N=[64], more_V=192,
           more_V_N=[32], tests=["tests/ops/test_op_errors.py", "-k", "targets_out_of_range or bad_temperature"],
           tests_s=120.0, budget_s=240.0, reps=1,
           providers={"policy": [OURS, GEMM, "cce-ce", "eager"], "logprobs": [OURS, GEMM, "cce", "eager"],
                      "divergence": [OURS, "eager"]},
           first_guess_s={"torch.compile": 20.0, "default": 10.0})
# shares of the time left that each benchmark step may use, among the steps still to run
SHARE = {"policy": 0.45, "logprobs": 0.25, "divergence": 0.30}
MORE_SHARE = {"policy": 0.5, "logprobs": 0.25, "divergence": 0.25}
RESERVE_S = 15.0  # kept back at the end for the kernels table and the summary


def plan(cfg: dict) -> list[dict]:
    """The benchmark steps in order: the three ops at the core shapes, then each op at more shapes
    (more N at the core V, then the other V). One child process per step: starting one costs seconds."""
    base = dict(H=cfg["H"], H_t=cfg["H_t"], dtype=cfg["dtype"], seq_len=cfg["seq_len"])
    steps = [dict(base, name=op, op=op, shapes=[(cfg["core_V"], n) for n in cfg["core_N"]], share=SHARE[op])
             for op in SHARE]
    more = [(cfg["core_V"], n) for n in cfg["more_N"]] + [(cfg["more_V"], n) for n in cfg["more_V_N"]]
    steps += [dict(base, name=f"more-{op}", op=op, shapes=more, share=MORE_SHARE[op]) for op in MORE_SHARE]
    return steps

