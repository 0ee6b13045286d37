"""TrainConfig validation, YAML and command-line sources, and the CLI's error exit."""

import pytest

from rlad.cli import build_parser, main
from rlad.config import TrainConfig, config_from_args

TEACHER = dict(teacher="preset:micro")


@pytest.mark.parametrize("kw,msg", [
    pytest.param(dict(algo="ppo"), r"algo='ppo': unknown algorithm; choose one of rlad, grpo, kdrl, opd, sft",
                 id="algo"),
    pytest.param(dict(algo="opd", opd_kind="forward_kl", **TEACHER),
                 r"opd_kind='forward_kl': choose one of jsd, reverse_kl, sampled", id="opd_kind"),
    pytest.param(dict(algo="grpo", group_size=1), r"group_size=1: group advantages need at least 2", id="group_size"),
    # the TRRD / PPO options: PolicyLossConfig's rules, reported against the TrainConfig field
    pytest.param(dict(alpha=1.5, **TEACHER), r"alpha=1.5: alpha must be <= 1\.0, got 1\.5", id="alpha"),
    pytest.param(dict(alpha=-0.1, **TEACHER), r"alpha=-0.1: alpha must be >= 0\.0, got -0\.1", id="alpha-negative"),
    pytest.param(dict(alpha="half", **TEACHER), r"alpha='half': alpha must be a Python int or float, got str",
                 id="alpha-type"),
    pytest.param(dict(eps_low=1.0, **TEACHER), r"eps_low=1.0: eps_low must be < 1\.0, got 1\.0", id="eps_low"),
    pytest.param(dict(eps_high=-0.2, **TEACHER), r"eps_high=-0.2: eps_high must be >= 0\.0, got -0\.2",
                 id="eps_high"),
    pytest.param(dict(teacher_clamp=0.0, **TEACHER),
                 r"teacher_clamp=0.0: teacher_clamp must be > 0, got 0\.0 \(.*None: off\)", id="teacher_clamp"),
    pytest.param(dict(dual_clip=0.5, **TEACHER), r"dual_clip=0.5: dual_clip must be > 1\.0, got 0\.5",
                 id="dual_clip"),
    pytest.param(dict(mixture="harmonic", **TEACHER),
                 r"mixture='harmonic': unknown mixture 'harmonic'; choose one of 'geometric', 'arithmetic'",
                 id="mixture"),
    pytest.param(dict(kd_estimator="k4", **TEACHER),
                 r"kd_estimator='k4': unknown kd_estimator 'k4'; choose one of .*'k1', 'k2', 'k3', 'full'",
                 id="kd_estimator"),
    pytest.param(dict(kd_estimator=None, **TEACHER), r"kd_estimator=None: choose one of k1, k2, k3, full",
                 id="kd_estimator-none"),
    pytest.param(dict(ref_kl_coef=-1.0, **TEACHER), r"ref_kl_coef=-1.0: ref_kl_coef must be >= 0\.0, got -1\.0",
                 id="ref_kl_coef"),
    pytest.param(dict(entropy_coef=float("nan"), **TEACHER), r"entropy_coef=nan: entropy_coef must be finite",
                 id="entropy_coef"),
    # trainer-only settings
    pytest.param(dict(aggregation="sum", **TEACHER),
                 r"aggregation='sum': choose one of token_mean, seq_mean, constant", id="aggregation"),
    pytest.param(dict(opd_beta=1.5, **TEACHER), r"opd_beta=1.5: must be in \[0, 1\]", id="opd_beta"),
    pytest.param(dict(kd_beta=-1.0, **TEACHER), r"kd_beta=-1.0: kd_beta, kd_beta_min and kd_beta_decay must be >= 0",
                 id="kd_beta"),
    pytest.param(dict(lr=0.0, **TEACHER), r"lr=0.0: must be a positive number", id="lr"),
    pytest.param(dict(top_p=0.0, **TEACHER), r"top_p=0.0: must be in \(0, 1\]", id="top_p"),
    pytest.param(dict(prompt_template="Q:", **TEACHER), r"prompt_template='Q:': must contain \{prompt\}",
                 id="prompt_template"),
    pytest.param(dict(mini_batches=200, prompts_per_step=2, group_size=2, **TEACHER),
                 r"mini_batches=200: cannot split a batch of 4 sequences", id="mini_batches"),
    pytest.param(dict(algo="sft", mini_batches=3, prompts_per_step=2, group_size=8, **TEACHER),
                 r"mini_batches=3: cannot split a batch of 2 sequences", id="mini_batches-sft"),
    pytest.param(dict(task="jsonl:/nonexistent.jsonl", **TEACHER), r"task='jsonl:/nonexistent.jsonl': JSONL file "
                 r"not found", id="task"),
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
