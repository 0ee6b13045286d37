"""The benchmark harness: providers compute the same loss on the same inputs, rows and CSV are
well formed, unavailable providers say why, plots render."""

import csv

import pytest
import torch

from benchmarks.harness import CSV_FIELDS, Shape, agreement, append_csv, env_info, make_inputs, plot, run
from benchmarks.providers import PROVIDERS

SHAPE = Shape(N=64, H=32, V=300, H_t=40, dtype=torch.float32, seq_len=32)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(SHAPE, torch.device("cpu"))


def test_inputs_are_peaked_and_sampled(inputs):
    logits = inputs["hidden"] @ inputs["weight"].T
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert 0.5 < entropy < 0.8 * torch.log(torch.tensor(float(SHAPE.V)))  # far from uniform
    # targets are drawn from the distribution: their mean probability beats a uniform guess by far
    assert p.gather(-1, inputs["targets"][:, None]).mean() > 20.0 / SHAPE.V


@pytest.mark.parametrize("op,pair", [("policy", ("eager", "rlad-torch")), ("logprobs", ("eager", "rlad-torch")),
                                     ("divergence", ("eager", "rlad-torch"))])
def test_providers_compute_the_same_loss(inputs, op, pair):
    provs = {p.name: p for p in PROVIDERS[op](SHAPE.seq_len)}
    vals = [provs[name].make(dict(inputs))().item() for name in pair]
    assert vals[0] == pytest.approx(vals[1], rel=1e-5, abs=1e-6)


def test_rows_csv_and_plot(tmp_path, inputs, monkeypatch):
    provs = {p.name: p for p in PROVIDERS["policy"](SHAPE.seq_len)}
    rows = run("policy", provs["eager"], SHAPE, dict(inputs), ["fwd", "bwd", "full"], torch.device("cpu"), reps=2)
    rows += run("policy", provs["rlad-torch"], SHAPE, dict(inputs), ["bwd"], torch.device("cpu"), reps=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU machine without the interpreter: Triton cannot run
    rows += run("policy", provs["rlad-triton"], SHAPE, dict(inputs), ["full"], torch.device("cpu"), reps=2)
    monkeypatch.undo()
    ok = [r for r in rows if r["provider"] == "eager"]
    assert [r["status"] for r in ok] == ["ok"] * 3 and all(r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] for r in ok)
    assert all(r["tflops"] > 0 for r in ok)
    fused_bwd = rows[3]  # gradients formed in the forward: no separate backward to time
    assert fused_bwd["status"] == "n/a" and "computed in the forward" in fused_bwd["note"]
    assert rows[-1]["status"] == "unavailable" and "CUDA only" in rows[-1]["note"]
    path = append_csv(rows, env_info(torch.device("cpu")), tmp_path / "bench.csv")
    with path.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == CSV_FIELDS and len(got) == len(rows)
    assert got[0]["device"].startswith("cpu") and got[0]["torch"] == torch.__version__
    pngs = plot(path, tmp_path)
    assert pngs and all(p.stat().st_size > 0 for p in pngs)


@pytest.mark.parametrize("op", ["policy", "logprobs", "divergence"])
def test_the_exact_providers_agree_on_the_gradients(inputs, op):
    """``run.py --check``: ours and eager compute the same loss, so the same dX and dW; the providers
    of another loss (Liger, CCE, the GEMM alone) are left out of the comparison."""
    provs = [p for p in PROVIDERS[op](SHAPE.seq_len) if p.name in ("rlad-torch", "eager", "liger-grpo", "gemm-6nhv")]
    got = dict(agreement(provs, dict(inputs)))
    assert set(got) == {"rlad-torch", "eager"} and got["rlad-torch"] == "the reference"
    diffs = [float(part.rsplit(" ", 1)[1]) for part in got["eager"].split(", ")]
    assert len(diffs) == 2 and max(diffs) < 1e-5, got
