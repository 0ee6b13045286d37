"""``rlad study`` (rlad/study.py): the grid, identical budgets, resumability, and the aggregation
(means and Student-t 95% intervals across seeds, checked by hand)."""

import csv
import json
import math

import pytest

from rlad.rundir import claim
from rlad.study import StudyError, aggregate, load_study, mean_ci, run_study

BASE = {"student": "preset:micro", "task": "echo", "levels": [1, 2], "steps": 2, "prompts_per_step": 2,
        "group_size": 2, "max_new_tokens": 4, "micro_batch_size": 8, "mini_batches": 1, "eval_prompts": 3,
        "eval_every": 1, "save_every": 1}


def _spec(tmp_path, arms, seeds=(0, 1), base=None, **extra):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "seeds": list(seeds), "base": base or BASE,
                                    "arms": arms, **extra}))
    return path


def test_mean_ci_by_hand():
    mean, half = mean_ci([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and half == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert mean_ci([0.4]) == (0.4, 0.0)
    assert mean_ci([0.2, None, float("nan"), 0.4])[0] == pytest.approx(0.3)


def _fake_run(study, arm, seed, acc, levels, curve, diag):
    run = next(r for r in study.runs if r.arm == arm and r.seed == seed)
    claim(study.out_dir, "study")
    claim(run.out, "run")
    final = {"n": 6.0, "accuracy": acc, "accuracy_se": 0.1}
    for lv, a in levels.items():
        final.update({f"n/L{lv}": 3.0, f"accuracy/L{lv}": a, f"accuracy_se/L{lv}": 0.2})
    (run.out / "summary.json").write_text(json.dumps({"steps": run.config.steps, "final": final,
                                                      "start": {"accuracy": 0.0}}))
    records = [{"step": s, "eval": True, "eval/accuracy": a} for s, a in curve]
    records += [{"step": s + 1, **diag} for s in range(2)]
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_aggregation_on_a_two_seed_grid(tmp_path):
    study = load_study(_spec(tmp_path, {"grpo": {"algo": "grpo"}}))
    _fake_run(study, "grpo", 0, 0.5, {1: 0.6, 2: 0.4}, [(0, 0.1), (2, 0.5)], {"reward": 0.25, "clip_frac_pos": 0.1})
    _fake_run(study, "grpo", 1, 0.7, {1: 1.0, 2: 0.4}, [(0, 0.3), (2, 0.7)], {"reward": 0.75, "clip_frac_pos": 0.3})
    res = aggregate(study)
    t = 12.706  # t_{0.975, 1}
    row = res["table"]["grpo"]
    assert row["accuracy"] == (pytest.approx(0.6), pytest.approx(t * math.sqrt(0.02) / math.sqrt(2)))
    assert row["accuracy/L1"][0] == pytest.approx(0.8) and row["accuracy/L2"] == (pytest.approx(0.4), 0.0)
    assert row["mean_reward"][0] == pytest.approx(0.5) and row["seeds"] == (2, 0.0)
    with open(tmp_path / "out" / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["seed"], float(r["accuracy"]), float(r["accuracy/L1"])) for r in runs] == [("0", 0.5, 0.6),
                                                                                          ("1", 0.7, 1.0)]
    with open(tmp_path / "out" / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    md = (tmp_path / "out" / "results.md").read_text()
    # accuracy: sd 0.1414 -> 12.706 x 0.1414 / sqrt 2 = 1.271; level 1: sd 0.2828 -> 2.541
    assert "| grpo | 0.0001 | 2 | 0.000 ± 0.000 | 0.600 ± 1.271 | 0.800 ± 2.541 | 0.400 ± 0.000 |" in md
    assert "| grpo | 0.500 ± 3.176 | 0.200 ± 1.271 |" in md  # the diagnostics: reward 0.25 / 0.75, clip+ 0.1 / 0.3
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0 and (tmp_path / "out" / "levels.png").is_file()


def test_budgets_must_match(tmp_path):
    with pytest.raises(StudyError, match="different budgets"):
        load_study(_spec(tmp_path, {"a": {"algo": "grpo"}, "b": {"algo": "grpo", "steps": 3}}))
    with pytest.raises(StudyError, match="'seed' is set by the study"):
        load_study(_spec(tmp_path, {"a": {"algo": "grpo", "seed": 3}}))
    with pytest.raises(StudyError, match="arm 'a'.*lr"):
        load_study(_spec(tmp_path, {"a": {"algo": "grpo", "lr": "fast"}}))


def test_a_report_dir_apart_from_the_runs(tmp_path):
    study = load_study(_spec(tmp_path, {"grpo": {"algo": "grpo"}}, report_dir=str(tmp_path / "ablation")))
    assert study.out_dir == tmp_path / "out" and study.report_dir == tmp_path / "ablation"
    _fake_run(study, "grpo", 0, 0.5, {1: 0.5}, [(0, 0.1), (2, 0.5)], {})
    aggregate(study)
    assert (tmp_path / "ablation" / "results.md").is_file() and not (tmp_path / "out" / "results.md").exists()


def test_sft_trains_on_as_many_responses(tmp_path):
    study = load_study(_spec(tmp_path, {"grpo": {"algo": "grpo"},
                                        "sft": {"algo": "sft", "teacher": "preset:tiny-teacher"}}))
    sft = next(r for r in study.runs if r.arm == "sft")
    assert sft.config.prompts_per_step == BASE["prompts_per_step"] * BASE["group_size"]


def test_a_real_grid_runs_then_skips_and_resumes(tmp_path, capsys):
    spec = _spec(tmp_path, {"grpo": {"algo": "grpo", "lr": 1e-3}}, jobs=2)
    res = run_study(load_study(spec), quiet=True)
    for seed in (0, 1):
        summary = json.loads((tmp_path / "out" / "grpo" / f"seed_{seed}" / "summary.json").read_text())
        assert res["runs"][f"grpo/seed_{seed}"]["accuracy"] == summary["final"]["accuracy"]
        assert summary["eval_sizes"] == {"L1": 3, "L2": 3}
    capsys.readouterr()
    run_study(load_study(spec), quiet=True)  # everything done: nothing runs
    assert "2 already done, 0 to run" in capsys.readouterr().out
    (tmp_path / "out" / "grpo" / "seed_1" / "summary.json").unlink()  # as if killed before its summary
    run_study(load_study(spec), quiet=True)
    assert "1 already done, 1 to run" in capsys.readouterr().out
    assert "--resume true" in (tmp_path / "out" / "grpo" / "seed_1" / "train.log").read_text()
    with pytest.raises(StudyError, match="written with other settings"):
        run_study(load_study(_spec(tmp_path, {"grpo": {"algo": "grpo", "lr": 2e-3}}, jobs=2)), quiet=True)

    # the budget: 2 -> 3 steps under the constant schedule (which resume allows) is no finished run:
    # both are continued to step 3; fewer steps than a run already made are refused
    more = _spec(tmp_path, {"grpo": {"algo": "grpo", "lr": 1e-3}}, jobs=2, base={**BASE, "steps": 3})
    res = run_study(load_study(more), quiet=True)
    assert "0 already done, 2 to run" in capsys.readouterr().out
    for seed in (0, 1):
        run = tmp_path / "out" / "grpo" / f"seed_{seed}"
        assert json.loads((run / "summary.json").read_text())["steps"] == 3
        assert "resumed from" in (run / "train.log").read_text()
    assert "Budget per run: 3 steps" in res["markdown"]
    with pytest.raises(StudyError, match=r"ran to steps=3, but the study asks for steps=2"):
        run_study(load_study(_spec(tmp_path, {"grpo": {"algo": "grpo", "lr": 1e-3}}, jobs=2)), quiet=True)


def test_every_run_asked_for_is_in_runs_csv_or_failed(tmp_path, monkeypatch):
    """A trainer that exits 0 without writing its summary is a failed run, not a missing row."""
    import rlad.study

    study = load_study(_spec(tmp_path, {"grpo": {"algo": "grpo"}}))
    _fake_run(study, "grpo", 0, 0.5, {1: 0.5}, [(0, 0.1), (2, 0.5)], {})

    def exits_0(self, name, cmd, log):  # as a trainer that returned without a summary would
        return 0

    monkeypatch.setattr(rlad.study.Children, "run", exits_0)
    with pytest.raises(StudyError, match=r"runs failed: grpo/seed_1 \(exit 0 without a summary.json"):
        run_study(study, quiet=True)
    with open(tmp_path / "out" / "runs.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0"]  # the finished run is aggregated all the same


def test_paired_differences_and_the_verdict(tmp_path):
    """rlad - grpo per seed at each level, its Student-t interval by hand, and the pre-registered
    verdict read from it; the headline's per-level table."""
    verdict = {"pair": ["rlad", "grpo"], "metric": "accuracy/L2", "support_above": 0.0, "reproduce_below": 0.03}
    study = load_study(_spec(tmp_path, {"rlad": {"algo": "grpo", "lr": 2e-4}, "grpo": {"algo": "grpo"}},
                             seeds=(0, 1, 2), headline="accuracy", verdict=verdict))
    assert study.pairs == [("rlad", "grpo")] and study.verdict.metric == "accuracy/L2"
    grpo_l2, rlad_l2 = [0.40, 0.50, 0.30], [0.50, 0.70, 0.45]  # differences 0.10, 0.20, 0.15
    for seed in range(3):
        _fake_run(study, "grpo", seed, 0.5, {1: 0.5, 2: grpo_l2[seed]}, [(2, 0.5)], {})
        _fake_run(study, "rlad", seed, 0.5, {1: 0.6, 2: rlad_l2[seed]}, [(2, 0.5)], {})
    res = aggregate(study)
    mean, half, n = res["pairs"][("rlad", "grpo")]["accuracy/L2"]
    assert n == 3 and mean == pytest.approx(0.15) and half == pytest.approx(4.303 * 0.05 / math.sqrt(3))
    assert res["pairs"][("rlad", "grpo")]["accuracy/L1"][:2] == (pytest.approx(0.1), pytest.approx(0.0))
    assert res["verdict"].startswith("supported (rlad - grpo on accuracy/L2: +0.150, 95% CI [+0.026, +0.274]")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| rlad - grpo | 3 | 0.000 ± 0.000 | 0.100 ± 0.000 | 0.150 ± 0.124 |" in md
    assert "**Verdict (pre-registered in the study file):** supported" in md


def test_the_verdict_by_hand():
    from rlad.study import Verdict

    v = Verdict(("rlad", "grpo"), "mean@8_T0.6/L4", support_above=0.0, reproduce_below=0.03)
    assert v.decide(0.05, 0.04, 6).startswith("supported")        # [0.01, 0.09]: above 0
    assert v.decide(0.00, 0.02, 6).startswith("not reproduced")   # [-0.02, 0.02]: upper bound below 0.03
    assert v.decide(0.01, 0.03, 6).startswith("unresolved")       # [-0.02, 0.04]
    assert v.decide(0.5, 0.0, 1).startswith("unresolved: 1 paired seed")


@pytest.mark.parametrize("extra, message", [
    ({"pairs": [["rlad", "rlad"]]}, "two different arm names"),
    ({"pairs": [["rlad", "kdrl"]]}, r"arm\(s\) \['kdrl'\] not in the study"),
    ({"headline": "accuracy/L2"}, "no level"),
    ({"verdict": {"pair": ["rlad", "grpo"]}}, "give pair and metric"),
    ({"verdict": {"pair": ["rlad", "grpo"], "metric": "accuracy/L2", "support_above": 0.1,
                  "reproduce_below": 0.03}}, "must not exceed"),
])
def test_comparisons_are_checked(tmp_path, extra, message):
    with pytest.raises(StudyError, match=message):
        load_study(_spec(tmp_path, {"rlad": {"algo": "grpo"}, "grpo": {"algo": "grpo"}}, **extra))


def test_a_sampled_headline_has_its_before_rl_row(tmp_path):
    """With a sampled headline, the per-level table starts with the step-0 evaluation (the same
    student in every arm): its mean and CI over seeds, from the runs' summaries."""
    study = load_study(_spec(tmp_path, {"grpo": {"algo": "grpo"}}, headline="mean@2_T0.6"))
    for seed, (start, final) in enumerate(((0.2, 0.3), (0.4, 0.5))):
        _fake_run(study, "grpo", seed, 0.5, {1: 0.5}, [(2, 0.5)], {})
        path = study.out_dir / "grpo" / f"seed_{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["start"].update({"mean@2_T0.6": start, "mean@2_T0.6/L1": start})
        summary["final"].update({"mean@2_T0.6": final, "mean@2_T0.6/L1": final})
        path.write_text(json.dumps(summary))
    md = aggregate(study)["markdown"]
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)  # sd of (0.2, 0.4) over sqrt 2, t_{0.975, 1}
    assert f"| before RL (step 0) | 0.300 ± {half:.3f} | 0.300 ± {half:.3f} |" in md
    assert f"| grpo | 0.400 ± {half:.3f} | 0.400 ± {half:.3f} |" in md
