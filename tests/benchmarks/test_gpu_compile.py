"""Every Triton launch the public ops can make compiles for real GPUs (sm_80, sm_90, sm_100),
without a GPU: no spills, shared memory within the architecture's limit, tensor-core MMA on
16-bit inputs. ``python -m benchmarks.gpu_compile_report`` does the work in a subprocess (it needs
Triton's JIT, not the interpreter the rest of the suite runs); it reads the committed compile
cache (``benchmarks/results/gpu_compile.json``, keyed by what Triton compiles by), so only
launches whose code or configuration changed are compiled again."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"logprobs_fwd_kernel", "logprobs_combine_kernel", "logprob_dlogits_kernel", "tn_gemm_kernel",
           "policy_fwd_kernel", "policy_combine_kernel", "div_stats_kernel", "div_combine_kernel", "jsd_sums_kernel",
           "div_dlogits_kernel"}


def _run(tmp_path, *args):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.gpu_compile_report", "--no-write", "--json", str(out), "--jobs", "2"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=3600, env=env, cwd=ROOT)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gpu_compile"))


def test_every_launch_compiles_cleanly(report):
    proc, rep = report
    bad = [f"sm_{r['arch']} {r['dtype']} {r['kernel']} [{r['variant']}]: {'; '.join(r['problems'])}"
           for r in rep["results"] if r["problems"]]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_kernel_dtype_and_architecture_is_covered(report):
    _, rep = report
    assert {80, 90} <= set(rep["archs"])
    seen = defaultdict(set)
    for r in rep["results"]:  # a launch made by calls of several dtypes (the combine kernels) counts for each
        for dtype in {call.split()[0] for call in r["calls"]}:
            seen[(r["arch"], dtype)].add(r["kernel"])
    for arch in rep["archs"]:
        for dtype in ("bf16", "fp16", "fp32"):
            assert seen[(arch, dtype)] == KERNELS, (arch, dtype, KERNELS ^ seen[(arch, dtype)])


def _values(results, kernel, arch, name, field=None):
    out = set()
    for r in results:
        if r["kernel"] == kernel and r["arch"] == arch and name in r["constexprs"]:
            v = r["constexprs"][name]
            out.add(v[field] if field else (v > 1 if name == "SPLIT" else v))
    return out


def test_every_option_of_every_kernel_is_covered(report):
    """Each constexpr option takes each of its values in some compiled launch, on every arch."""
    _, rep = report
    res = rep["results"]
    both = {True, False}
    for arch in rep["archs"]:
        for flag, values in (("ARITHMETIC", both), ("HAS_CLAMP", both), ("GATE", both), ("HAS_DUAL", both),
                             ("KD", {0, 1, 2, 3}), ("ENT_BONUS", both), ("CISPO", both)):
            assert _values(res, "policy_fwd_kernel", arch, "EPI", flag) == values, (arch, flag)
        for field in ("teacher_logp", "ref_logp", "token_weights", "kd_weights"):
            assert _values(res, "policy_fwd_kernel", arch, "HAS", field) == both, (arch, field)
        for kernel in ("policy_fwd_kernel", "logprobs_fwd_kernel"):
            for flag in ("HAS_BIAS", "ENTROPY", "SPLIT", "SOFTCAP"):
                assert _values(res, kernel, arch, flag) == both, (arch, kernel, flag)
        assert _values(res, "logprob_dlogits_kernel", arch, "SOFTCAP") == both
        for kernel in ("div_stats_kernel", "div_dlogits_kernel", "jsd_sums_kernel"):
            for flag in ("CAP_S", "CAP_T"):
                assert _values(res, kernel, arch, flag) == both, (arch, kernel, flag)
        for kernel in ("div_stats_kernel", "div_dlogits_kernel", "div_combine_kernel"):
            assert _values(res, kernel, arch, "KIND") == {0, 1, 2}, (arch, kernel)
        assert _values(res, "div_stats_kernel", arch, "SPLIT") == both
        assert _values(res, "div_stats_kernel", arch, "HAS_BS") == both
        assert _values(res, "logprob_dlogits_kernel", arch, "HAS_GENT") == both


def test_a_spilling_configuration_is_caught(tmp_path):
    """The check can fail: float32 tiles far too large for sm_80's registers are reported."""
    proc, rep = _run(tmp_path, "--archs", "80", "--dtypes", "fp32", "--groups", "standard", "--calls", "fp32 logprobs",
                     "--override", "block_n=128,block_v=256,block_h=64,num_warps=4,num_stages=2", "--no-cache")
    assert proc.returncode == 1
    assert any("spills" in p for r in rep["results"] for p in r["problems"])
