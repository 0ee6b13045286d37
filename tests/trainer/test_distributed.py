"""Data-parallel training (torchrun, FSDP2, gloo on CPU): 2 ranks compute what 1 rank computes on
the same global batch; sharded checkpoints resume on another world size; a failing rank ends the
job with its rank named, and the run resumes; the normalizer and the metrics are reduced over ranks.

Every run is a real ``python -m torch.distributed.run ... -m rlad train`` subprocess (2 CPU
processes, gloo) on untrained ``preset:micro`` models: opd (full-vocabulary JSD to a random
teacher) has a non-zero gradient on every token, so every step moves every parameter, and it runs
the teacher's sharded head inside the student's loss.

Tolerance of the parameter comparison: the runs are float32 and the same arithmetic, except that
the gradient is a sum over ranks (FSDP2's reduce-scatter) and the loss normalizer and the metrics
are all-reduced, so sums are taken in another order. Measured after 3 AdamW steps at lr 1e-3 (a
parameter moves by ~1e-3 per step): at most 9e-8 (opd) and 9e-7 (kdrl with the full KD and a
reference KL, seq_mean; AdamW's per-coordinate normalization magnifies the rounding of tiny
gradients), so 5e-6 leaves a factor 5 over the worst; a normalizer that is not reduced over ranks
moves the parameters by 4e-4 and doubles the logged loss (metrics are checked at rel 1e-4).
Left out of the metric comparison: ``num_tokens`` (the fused loss's token count per call: a
micro-batch size, not a mean, so it depends on the rows per rank), and ``clip_frac_pos`` /
``clip_frac_neg`` / ``dual_clip_frac``, fractions of a micro-batch's tokens with A > 0 (A < 0)
that the trainer averages with token weights, not with their own denominators, so their step
value depends on how the rows fall into micro-batches (as it already does on micro_batch_size in
one process); every other metric is a token or step mean and is compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rlad
from rlad.report import WALL_CLOCK

REPO = str(Path(rlad.__file__).resolve().parents[1])
PARAM_TOL = 5e-6
METRIC_TOL = 1e-4
# timings, and the metrics that depend on the micro-batch composition (see the module docstring)
TIMED = (*WALL_CLOCK, "num_tokens", "clip_frac_pos", "clip_frac_neg", "dual_clip_frac")


def _args(out: Path, steps: int = 3, *extra: str) -> list[str]:
    return ["train", "--out-dir", str(out), "--algo", "opd", "--teacher", "preset:micro", "--student", "preset:micro",
            "--task", "echo", "--levels", "1", "--steps", str(steps), "--prompts-per-step", "4", "--group-size", "2",
            "--max-new-tokens", "4", "--micro-batch-size", "8", "--mini-batches", "1", "--eval-prompts", "2",
            "--eval-every", "0", "--save-every", "1", "--quiet", "true", "--threads", "1", "--lr", "1e-3", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLAD_FAIL", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_", "TORCHELASTIC"))}
    # the ranks are CPU processes (gloo) on any machine: on a GPU machine they would each take a
    # GPU (LOCAL_RANK picks it), and a one-GPU machine has no cuda:1
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               **extra)
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m rlad <args>``, run from
    the repository (so ``-m rlad`` is this checkout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "rlad", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def single(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlad", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows]


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys(), (ra.keys(), rb.keys())
        for k, v in ra.items():
            if isinstance(v, float):
                assert rb[k] == pytest.approx(v, rel=METRIC_TOL, abs=1e-9), (ra["step"], k, v, rb[k])
            else:
                assert rb[k] == v, (ra["step"], k)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The reference: 3 steps on 1 rank (torchrun, so the same per-prompt sampling seeds)."""
    out = tmp_path_factory.mktemp("dist") / "one"
    _ok(torchrun(1, _args(out)))
    return out


def test_two_ranks_compute_what_one_rank_computes(tmp_path, one_rank):
    """Same global batch and seed: after 3 steps the parameters agree within float32 summation
    order, and so does every logged metric (loss, divergence, gradient norm, rewards, eval)."""
    two = tmp_path / "two"
    t0 = time.perf_counter()
    proc = torchrun(2, _args(two))
    _ok(proc)
    assert "distributed: 2 ranks (gloo), 2 prompts per rank per step" in proc.stdout
    assert proc.stdout.count("step 3/3") == 1  # only rank 0 logs
    diff = _max_diff(_weights(one_rank, 3), _weights(two, 3))
    assert diff <= PARAM_TOL, diff
    _assert_same_metrics(_records(one_rank), _records(two))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["checkpoint"].endswith("step_000003")
    ck = two / "checkpoints" / "step_000003"
    assert sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ck / "COMPLETE").read_text())["world_size"] == 2
    print(f"2-rank run {time.perf_counter() - t0:.1f} s, max |param diff| vs 1 rank {diff:.3g}")


KDRL_REF = ["--algo", "kdrl", "--kd-estimator", "full", "--kd-reward-mask", "false", "--ref-kl-coef", "0.1",
            "--aggregation", "seq_mean"]


@pytest.mark.slow
def test_two_ranks_compute_what_one_rank_computes_kdrl_with_a_reference_model(tmp_path):
    """The policy-loss path: kdrl with the exact full-vocabulary KD (the teacher's sharded head in the
    student's loss), a sharded reference model scored for the k3 KL, the teacher scored for
    log-probs, and seq_mean aggregation (row counts all-reduced)."""
    runs = {n: tmp_path / f"r{n}" for n in (1, 2)}
    for n, out in runs.items():
        _ok(torchrun(n, _args(out, 3, *KDRL_REF)))
    diff = _max_diff(_weights(runs[1], 3), _weights(runs[2], 3))
    print(f"kdrl: max |param diff| 2 ranks vs 1 rank {diff:.3g}")
    assert diff <= PARAM_TOL, diff
    _assert_same_metrics(_records(runs[1]), _records(runs[2]))
    assert "kd_mean" in _records(runs[2])[1]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rlad", "sft"])
def test_two_ranks_compute_what_one_rank_computes_with_trained_models(tmp_path, models, algo):
    """The trained echo student and teacher (mixed rewards, so the TRRD ratio and the group
    advantages are non-zero; sft: the teacher's correct solutions, its pool built on every rank and
    its picks drawn globally): 2 ranks match 1 rank."""
    runs = {n: tmp_path / f"r{n}" for n in (1, 2)}
    for n, out in runs.items():
        args = _args(out, 2, "--algo", algo, "--student", models["student"], "--teacher", models["teacher"],
                     "--group-size", "4", "--max-new-tokens", "6", "--sft-prompts", "16")
        _ok(torchrun(n, args))
    diff = _max_diff(_weights(runs[1], 2), _weights(runs[2], 2))
    print(f"{algo}: max |param diff| 2 ranks vs 1 rank {diff:.3g}")
    assert diff <= PARAM_TOL, diff
    _assert_same_metrics(_records(runs[1]), _records(runs[2]))
    if algo == "rlad":
        assert 0 < _records(runs[2])[1]["reward"] < 1  # mixed rewards: advantages are not all 0


@pytest.mark.slow
def test_two_ranks_compute_what_one_rank_computes_with_an_untied_head(tmp_path, tok):
    """A student whose lm_head is its own parameter (not the embedding): the root FSDP unit owns
    both, and the head's gradient is reduced like every other."""
    from rlad.models import preset_config

    config = preset_config("micro", len(tok))
    config.tie_word_embeddings = False
    spec = tmp_path / "untied.json"
    spec.write_text(json.dumps(config.to_dict()))
    runs = {n: tmp_path / f"r{n}" for n in (1, 2)}
    for n, out in runs.items():
        _ok(torchrun(n, _args(out, 3, "--student", f"config:{spec}")))
    a, b = _weights(runs[1], 3), _weights(runs[2], 3)
    assert "lm_head.weight" in a  # saved on its own: not tied
    assert _max_diff(a, b) <= PARAM_TOL
    _assert_same_metrics(_records(runs[1]), _records(runs[2]))


@pytest.mark.slow
def test_nproc_relaunches_under_torchrun(tmp_path):
    proc = single([*_args(tmp_path / "run", 1), "--nproc", "2"])
    _ok(proc)
    assert "torch.distributed.run --standalone --nproc-per-node 2 -m rlad train" in proc.stdout
    assert "distributed: 2 ranks (gloo)" in proc.stdout


def test_prompts_per_step_must_divide_among_ranks(tmp_path):
    proc = torchrun(2, _args(tmp_path / "odd", 1, "--prompts-per-step", "3"))
    assert proc.returncode != 0
    assert "prompts_per_step=3: must be divisible by the number of ranks (2)" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_a_sharded_checkpoint_resumes_on_another_world_size(tmp_path, one_rank, first, then):
    """2 steps on ``first`` ranks, then 1 more on ``then`` ranks from its checkpoint: the same
    parameters and metrics as 3 uninterrupted steps (DCP reshards; the prompt stream and the
    per-prompt sampling seeds are global)."""
    out = tmp_path / "run"
    _ok(torchrun(first, _args(out, 2)))
    proc = torchrun(then, _args(out, 3, "--resume", "true"))
    _ok(proc)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert f"written on {first}" in proc.stdout
    assert _max_diff(_weights(one_rank, 3), _weights(out, 3)) <= PARAM_TOL
    steps = [[r for r in _records(d) if not r.get("eval")] for d in (one_rank, out)]  # the 2-step run's final
    _assert_same_metrics(*steps)                                                     # eval is extra


@pytest.mark.slow
def test_a_single_process_resumes_a_sharded_checkpoint(tmp_path, one_rank):
    """Without torchrun, a 2-rank checkpoint loads into the plain model (DCP without a process
    group): its step-2 weights are those of the 2-rank run, and the run goes on (sampling then
    draws from torch's global stream, as a single process does)."""
    out = tmp_path / "run"
    _ok(torchrun(2, _args(out, 2)))
    proc = single(_args(out, 3, "--resume", "true"))
    _ok(proc)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert (out / "checkpoints" / "step_000003" / "model" / "model.safetensors").is_file()  # a plain checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "exit", "hang"])
def test_a_failing_rank_ends_the_job_and_the_run_resumes(tmp_path, one_rank, mode):
    """Rank 1 raises, dies at once (``os._exit(1)``) or hangs at the start of step 3: the job ends
    within a bounded time with a non-zero exit and a message naming the rank (a hang: rank 0's
    collective times out after ``--dist-timeout``); ``--resume true`` continues from the step-2
    checkpoint to the uninterrupted run's parameters."""
    out = tmp_path / "run"
    t0 = time.perf_counter()
    extra = ["--dist-timeout", "10"] if mode == "hang" else []
    proc = torchrun(2, _args(out, 3, *extra), timeout=240, RLAD_FAIL_STEP="2", RLAD_FAIL_RANK="1",
                    RLAD_FAIL_MODE=mode)
    took = time.perf_counter() - t0
    print(f"{mode}: the job ended after {took:.1f} s with exit status {proc.returncode}")
    assert proc.returncode != 0
    assert took < 120, took
    text = proc.stdout + proc.stderr
    if mode == "raise":
        assert "rank 1 of 2: failed: RuntimeError: test hook: rank 1 fails at step 2" in text, text[-3000:]
        assert "rank      : 1" in text  # torchrun's failure summary names the failed rank
    elif mode == "exit":
        assert "rank 1: test hook: exiting at step 2" in text, text[-3000:]
        assert "rank      : 1" in text and "exitcode  : 1" in text, text[-3000:]
    else:  # rank 0 gives up waiting for rank 1
        assert "rank 0 of 2: failed:" in text and "rank      : 0" in text, text[-3000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000001", "step_000002"]
    proc = torchrun(2, _args(out, 3, "--resume", "true"))
    _ok(proc)
    assert "at step 2" in proc.stdout
    assert _max_diff(_weights(one_rank, 3), _weights(out, 3)) <= PARAM_TOL


# ----------------------------------------------------------------------------- reductions
def _reduction_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rlad import distributed as D
    from rlad.train import host_metrics, normalizer_for

    D.init(torch.device("cpu"), 60)
    try:
        roll, cfgs = _reduction_batch()
        mine = slice(rank * 4, rank * 4 + 4)
        part = roll.select(torch.arange(8)[mine])
        out = {}
        for name, cfg in cfgs.items():
            norm, tw = normalizer_for(cfg, part, torch.arange(4))
            out[name] = float(norm)
        lengths = part.loss_mask.sum(-1).float()
        stats = {"tok": [(lengths.mean(), lengths.sum())], "row": [(lengths.sum(), 1)],
                 "none": [(torch.tensor(5.0), torch.tensor(0.0))] if rank == 0 else [(torch.tensor(1.0), 1)]}
        out["metrics"] = host_metrics(stats)
        Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    finally:
        D.close()


def _reduction_batch():
    """8 rows with response lengths 1..8 (rank 0 holds the short ones), one row dropped."""
    from rlad.config import TrainConfig
    from rlad.rollout import Rollout

    B, L = 8, 10
    targets = torch.full((B, L - 1), -100)
    for i in range(B):
        targets[i, :i + 1] = 3
    ids = torch.zeros(B, L, dtype=torch.long)
    roll = Rollout(ids, torch.ones_like(ids), torch.zeros_like(ids), targets, [], [""] * B, torch.zeros(B), 2,
                   keep=torch.tensor([True] * 7 + [False]))
    base = dict(algo="grpo", task="echo", max_new_tokens=16, quiet=True)
    cfgs = {a: TrainConfig(aggregation=a, **base) for a in ("token_mean", "seq_mean", "constant")}
    return roll, cfgs


def test_normalizer_and_metrics_are_reduced_over_ranks(tmp_path):
    """Two gloo processes, each with half of a batch whose token counts differ between them: the
    normalizer of every aggregation and every metric are those of the whole batch in one process."""
    import socket

    import torch.multiprocessing as mp

    from rlad.train import host_metrics, normalizer_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_reduction_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    roll, cfgs = _reduction_batch()
    for name, cfg in cfgs.items():
        assert results[0][name] == pytest.approx(float(normalizer_for(cfg, roll, torch.arange(8))[0]), rel=1e-6)
    assert results[0]["token_mean"] == 1 + 2 + 3 + 4 + 5 + 6 + 7  # the dropped row's 8 tokens leave it
    lengths = roll.loss_mask.sum(-1).float()
    whole = host_metrics({"tok": [(lengths[:4].mean(), lengths[:4].sum()), (lengths[4:].mean(), lengths[4:].sum())],
                          "row": [(lengths[:4].sum(), 1), (lengths[4:].sum(), 1)],
                          "none": [(torch.tensor(5.0), torch.tensor(0.0)), (torch.tensor(1.0), 1)]})
    assert results[0]["metrics"] == pytest.approx(whole, rel=1e-12)


def _count_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from rlad import distributed as D
    from rlad.batching import same_count

    D.init(torch.device("cpu"), 60)
    try:
        parts = [(f"r{rank}p{i}",) for i in range(3 if rank == 0 else 1)]  # rank 0 has 3 micro-batches, rank 1 one
        Path(result_dir, f"{rank}.json").write_text(json.dumps(list(same_count(parts))))
    finally:
        D.close()


def test_ranks_run_the_same_number_of_micro_batches(tmp_path):
    """Token-budget micro-batches differ in number between ranks; FSDP2 needs every rank in every
    forward, so the rank with fewer repeats its last one as padding (``real`` False)."""
    import socket

    import torch.multiprocessing as mp

    from rlad.batching import same_count

    assert list(same_count([("a",), ("b",)])) == [("a", True), ("b", True)]  # one process: unchanged
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_count_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got[0] == [["r0p0", True], ["r0p1", True], ["r0p2", True]]
    assert got[1] == [["r1p0", True], ["r1p0", False], ["r1p0", False]]


@pytest.mark.slow
def test_two_ranks_with_token_budget_micro_batches_and_gradient_checkpointing(tmp_path, models):
    """``--micro-batch-tokens``: each rank packs its own rows (their number of micro-batches may
    differ; the padding ones weigh 0); the 2-rank run also recomputes its sharded decoder layers
    (``--gradient-checkpointing``), and still computes what 1 rank computes without it."""
    runs = {n: tmp_path / f"r{n}" for n in (1, 2)}
    for n, out in runs.items():
        args = _args(out, 2, "--algo", "rlad", "--student", models["student"], "--teacher", models["teacher"],
                     "--group-size", "4", "--max-new-tokens", "8", "--micro-batch-tokens", "40",
                     *(["--gradient-checkpointing", "true"] if n == 2 else []))
        _ok(torchrun(n, args))
    diff = _max_diff(_weights(runs[1], 2), _weights(runs[2], 2))
    print(f"token budget: max |param diff| 2 ranks vs 1 rank {diff:.3g}")
    assert diff <= PARAM_TOL, diff
    _assert_same_metrics(_records(runs[1]), _records(runs[2]))


def test_export_gathers_a_sharded_checkpoint_in_one_process(tmp_path, one_rank):
    """``rlad export`` reads a sharded checkpoint's DCP shards without a process group into a
    ``transformers`` folder: the weights the run gathered into its own ``model/``, exactly."""
    from transformers import AutoModelForCausalLM

    ck = one_rank / "checkpoints" / "step_000003"
    proc = single(["export", str(ck), "--out", str(tmp_path / "exported")])
    _ok(proc)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    gathered = _weights(one_rank, 3)
    for k, v in gathered.items():
        assert torch.equal(exported[k], v), k
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_on_two_ranks(tmp_path, tok):
    """A plain single-process checkpoint (``model/`` + an index-keyed optimizer state) resumes
    under torchrun: its weights go in before sharding and its AdamW state is converted to the
    sharded optimizer, so after one more step every parameter's AdamW step count is 3, not 1."""
    from rlad.checkpoint import load_sharded
    from rlad.models import load_model

    out = tmp_path / "run"
    _ok(single(_args(out, 2)))
    proc = torchrun(2, _args(out, 3, "--resume", "true"))
    _ok(proc)
    assert "resumed from" in proc.stdout and "written on 1" in proc.stdout
    model = load_model("preset:micro", tok, seed=123)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    load_sharded(out / "checkpoints" / "step_000003", model, opt)
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert steps == {3.0}, steps
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))


@pytest.mark.slow
def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(tmp_path):
    """One rank's shard of the newest checkpoint is altered: rank 0 finds it against the manifest,
    sets the checkpoint aside, and every rank resumes from the previous one, reaching the
    uninterrupted run's parameters."""

    out, straight = tmp_path / "run", tmp_path / "straight"
    _ok(torchrun(2, _args(out, 2)))
    _ok(torchrun(2, _args(straight, 3)))
    _ok(torchrun(2, _args(out, 3, "--resume", "true", "--save-every", "1")))  # step 3 on top of step 2
    shard = out / "checkpoints" / "step_000003" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = torchrun(2, _args(out, 3, "--resume", "true"))
    _ok(proc)
    assert "dcp/__1_0.distcp is corrupted" in proc.stdout and "at step 2" in proc.stdout
    assert (out / "checkpoints" / "unusable" / "step_000003").is_dir()
    assert _max_diff(_weights(straight, 3), _weights(out, 3)) <= PARAM_TOL
