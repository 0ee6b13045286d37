"""TrainConfig validation, YAML and command-line sources, and the CLI's error exit."""

import pytest

from rlad.cli import build_parser, main
from rlad.config import TrainConfig, config_from_args

TEACHER = dict(teacher="preset:micro")


@pytest.mark.parametrize("kw,msg", [
    (dict(algo="ppo"), r"algo='ppo': unknown algorithm; choose one of rlad, grpo, kdrl, opd, sft"),
    (dict(algo="grpo", group_size=1), r"group_size=1: group advantages need at least 2"),
    (dict(alpha=1.5, **TEACHER), r"alpha=1.5: the TRRD mixture weight must be in \[0, 1\]"),
    (dict(eps_low=1.0, **TEACHER), r"eps_low=1.0: must be in \[0, 1\)"),
    (dict(teacher_clamp=0.0, **TEACHER), r"teacher_clamp=0.0: must be > 0, or None"),
    (dict(dual_clip=0.5, **TEACHER), r"dual_clip=0.5: must be > 1"),
    (dict(aggregation="sum", **TEACHER), r"aggregation='sum': choose one of token_mean, seq_mean, constant"),
    (dict(kd_estimator="k4", **TEACHER), r"kd_estimator='k4'"),
    (dict(lr=0.0, **TEACHER), r"lr=0.0: must be a positive number"),
    (dict(top_p=0.0, **TEACHER), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(prompt_template="Q:", **TEACHER), r"prompt_template='Q:': must contain \{prompt\}"),
    (dict(mini_batches=200, prompts_per_step=2, group_size=2, **TEACHER), r"mini_batches=200: cannot split"),
    (dict(task="jsonl:/nonexistent.jsonl", **TEACHER), r"JSONL file not found"),
])
def test_invalid_settings_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


@pytest.mark.parametrize("algo", ["rlad", "kdrl", "opd", "sft"])
def test_teacher_algorithms_need_a_teacher(algo):
    with pytest.raises(ValueError, match=rf"teacher=None: algo='{algo}' needs a teacher"):
        TrainConfig(algo=algo)


def test_yaml_then_flags(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("algo: grpo\nlr: 0.001\nlevels: [1, 2]\nsteps: 7\n")
    args = build_parser().parse_args(["train", "--config", str(p), "--lr", "5e-5", "--teacher-clamp", "none"])
    cfg = config_from_args(args)
    assert (cfg.algo, cfg.lr, cfg.levels, cfg.steps, cfg.teacher_clamp) == ("grpo", 5e-5, [1, 2], 7, None)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: grpo\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        TrainConfig.from_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="cannot read config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_cli_reports_invalid_config_and_exits_2(capsys):
    assert main(["train", "--algo", "rlad", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "rlad train: error: config: teacher=None: algo='rlad' needs a teacher" in err


def test_cli_help_lists_grouped_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--alpha", "--group-size", "--kd-estimator", "--resume", "--micro-batch-size"):
        assert flag in out
    assert "algorithm:" in out and "rollout:" in out
