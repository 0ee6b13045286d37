"""The fair study's scripts (studies/fair): prepare.py is deterministic (a second run, and a
student-only rebuild, give bitwise-identical models), and preconditions.py measures and judges
on a tiny model; its rules by hand."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2] / "studies" / "fair"
TINY = ["--teacher-steps", "3", "--warmup-steps", "3", "--batch", "4", "--eval-prompts", "4", "--quiet",
        "--teacher-preset", "preset:micro", "--student-preset", "preset:micro"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"fair_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("fair") / "models"
    _script("prepare").main(["--out", str(out), *TINY])
    return out


def test_prepare_is_bitwise_reproducible(prepared, tmp_path):
    prepare = _script("prepare")
    again = tmp_path / "again"
    prepare.main(["--out", str(again), *TINY])
    for role in ("teacher", "student_init"):
        assert _weights(again / role) and _weights(again / role) == _weights(prepared / role), role
    # prepare.json records each model's weights' SHA-256 and what built them
    manifest = json.loads((again / "prepare.json").read_text())
    for role in ("teacher", "student_init"):
        assert manifest["sha256"][role] == hashlib.sha256((again / role / "model.safetensors").read_bytes()).hexdigest()
        env = manifest["built_on"][role]
        assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["cpu"]
    (again / "student_init" / "model.safetensors").unlink()
    manifest["built_on"]["teacher"]["cpu"] = "the teacher's machine"  # as if the teacher came from elsewhere
    (again / "prepare.json").write_text(json.dumps(manifest))
    prepare.main(["--out", str(again), "--student-only", *TINY])  # the student alone, the teacher kept
    assert _weights(again / "student_init") == _weights(prepared / "student_init")
    kept = json.loads((again / "prepare.json").read_text())
    assert kept["built_on"]["teacher"]["cpu"] == "the teacher's machine" and kept["sha256"] == manifest["sha256"]
    other = list(TINY)
    other[other.index("--teacher-preset") + 1] = "preset:tiny-teacher"
    with pytest.raises(SystemExit, match="was built with teacher="):  # another teacher: not silently kept
        prepare.main(["--out", str(again), "--student-only", *other])


def test_preconditions_on_a_tiny_model(prepared, tmp_path, capsys):
    pre = _script("preconditions")
    status = pre.main(["--models", str(prepared), "--out", str(tmp_path), "--eval-prompts", "3", "--samples", "2",
                       "--probe-prompts", "4", "--group-size", "2", "--max-new-tokens", "4", "--temperature", "0.7"])
    report = json.loads((tmp_path / "preconditions.json").read_text())
    # the probe samples at the study's rollout temperature, and the report says which
    assert report["measured"]["train_temperature"] == 0.7 and "(sampled at T=0.7)" in report["checks"][2][1]
    results = [row[3] for row in report["checks"]]
    # an untrained 3-step teacher solves nothing: the teacher's check fails, so the exit status is 1
    assert report["measured"]["teacher_hardest"] < pre.TEACHER_MIN and results[0] == "FAIL" and status == 1
    assert results[3] == "PASS" and results[4] == "not checked"  # no prose; no clip fraction given yet
    probe = report["measured"]["probe"]
    assert all(0.0 <= probe[k]["value"] <= 1.0 for k in ("trrd_zeroed_frac", "trrd_protected_frac"))
    assert "# Preconditions of the fair study" in capsys.readouterr().out
    text = (tmp_path / "preconditions.md").read_text()
    assert text.count("| FAIL |") == results.count("FAIL")
    manifest = json.loads((prepared / "prepare.json").read_text())
    sha = manifest["sha256"]
    assert report["models"]["sha256"] == sha and f"teacher {sha['teacher'][:16]}" in text  # which models
    assert f"both built on {manifest['built_on']['teacher']['cpu']}" in text


def test_precondition_rules_by_hand(tmp_path):
    pre = _script("preconditions")
    m = {"hardest_level": 4, "samples": 8, "teacher_hardest": 0.6, "student_hardest": 0.3,
         "teacher_pref_frac": 0.1, "probe": {"teacher_pref_frac": {"value": 0.1, "tokens": 50}}}
    rows = pre.checks(m, 0.0, 0, 100, (0.01, 2, "grpo"))
    assert [r[3] for r in rows] == ["PASS"] * 5  # every bound inclusive
    m.update(teacher_hardest=0.59, student_hardest=0.31, teacher_pref_frac=0.09)
    rows = pre.checks(m, 0.3, 0, 100, (0.009, 2, "grpo"))
    assert [r[3] for r in rows] == ["FAIL"] * 5
    runs = tmp_path / "runs.csv"
    runs.write_text("arm,seed,mean_clip_frac\ngrpo,0,0.01\ngrpo,1,0.03\nrlad,0,0.5\n")
    assert pre.mean_clip(runs, "grpo") == (pytest.approx(0.02), 2)


def test_the_corpus_check_sees_prose_endings():
    from rlad.demo import ProseStyle
    from rlad.tasks import get_task

    pre = _script("preconditions")
    assert pre.corpus_defects(get_task("chains"), [2, 3, 4], draws=200) == 0
    bad = pre.corpus_defects(ProseStyle(get_task("chains"), 0.5), [2, 3, 4], draws=200)
    assert 60 < bad < 140  # about half (binomial, n = 200: 5 standard deviations either side)


def test_kd_ratio_on_a_study_arm(prepared, tmp_path, capsys):
    """studies/kd_ratio.py --study reads the arm's own models and settings (a micro student solves
    nothing: no advantage gradient, a clear exit), refuses a non-kdrl arm; its table is beta times
    the median of |g_KD| / |g_adv| over the batches with a signal, by hand."""
    import runpy
    import sys

    study = tmp_path / "s.yaml"
    study.write_text(f"out_dir: {tmp_path / 'out'}\nseeds: [0]\nbase: {{student: {prepared / 'student_init'}, "
                     f"teacher: {prepared / 'teacher'}, task: chains, levels: [2, 3], prompts_per_step: 2, "
                     "group_size: 2, max_new_tokens: 4, temperature: 0.8, eval_prompts: 4}\n"
                     "arms:\n  kdrl: {algo: kdrl, kd_variant: rlad_paper, kd_beta: 0.2}\n  grpo: {algo: grpo}\n")
    script = str(ROOT.parent / "kd_ratio.py")
    argv = sys.argv
    try:
        sys.argv = [script, "--study", str(study), "--arm", "kdrl", "--batches", "1"]
        with pytest.raises(SystemExit, match=r"arm kdrl: 1 batches of 2 x 2 at T=0\.8.*no rollout batch"):
            runpy.run_path(script, run_name="__main__")
        sys.argv = [script, "--study", str(study), "--arm", "grpo"]
        with pytest.raises(SystemExit, match="algo=grpo"):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    kd = runpy.run_path(script)
    rows = [{"adv": 2.0, "kd": 1.0}, {"adv": 1.0, "kd": 3.0}, {"adv": 4.0, "kd": 4.0}, {"adv": 0.0, "kd": 5.0}]
    for r in rows:
        r.update(reward=0.5, groups_equal=0.5, max_gap=1.0, gap_over_3=0.0)
    capsys.readouterr()
    kd["report"](rows, "title", beta=0.2)
    out = capsys.readouterr().out
    assert "left out" in out.splitlines()[4]  # the batch with no advantage gradient
    # ratios at beta = 1: 0.5, 3, 1 -> median 1, min 0.5, max 3
    assert "| 0.2 | 0.200 | 0.100 | 0.600 |" in out and "| 0.01 | 0.010 | 0.005 | 0.030 |" in out
