"""TrainConfig validation, YAML and command-line sources, and the CLI's error exit."""

import re

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
    pytest.param(dict(task="chains", reward="numeric", **TEACHER), r"reward='numeric': applies to jsonl tasks only",
                 id="reward-builtin"),
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


# ---------------------------------------------------------------- strict types, no NaN (no silent coercion)
@pytest.mark.parametrize("kw,msg", [
    pytest.param(dict(grad_clip=float("nan")), r"grad_clip=nan: must be a finite number, got nan", id="grad_clip-nan"),
    pytest.param(dict(kd_beta=float("nan")), r"kd_beta=nan: must be a finite number", id="kd_beta-nan"),
    pytest.param(dict(weight_decay=float("nan")), r"weight_decay=nan: must be a finite number", id="weight_decay-nan"),
    pytest.param(dict(weight_decay=-1.0), r"weight_decay=-1.0: must be >= 0", id="weight_decay-negative"),
    pytest.param(dict(lr=float("inf")), r"lr=inf: must be a finite number", id="lr-inf"),
    pytest.param(dict(temperature=float("nan")), r"temperature=nan: must be a finite number", id="temperature-nan"),
    pytest.param(dict(betas=[0.9, float("nan")]), r"betas=\[0.9, nan\]: item 1: must be a finite number",
                 id="betas-nan"),
    pytest.param(dict(eps_high=float("nan")), r"eps_high=nan: eps_high must be finite", id="eps_high-nan"),
    pytest.param(dict(teacher_clamp=float("nan")), r"teacher_clamp=nan: teacher_clamp must be finite",
                 id="teacher_clamp-nan"),
    pytest.param(dict(ref_kl_coef=float("nan")), r"ref_kl_coef=nan: ref_kl_coef must be finite", id="ref_kl_coef-nan"),
    pytest.param(dict(steps=True), r"steps=True: expected an integer, got a boolean", id="steps-bool"),
    pytest.param(dict(steps="3"), r"steps='3': expected an integer, got a string; write the number without quotes",
                 id="steps-str"),
    pytest.param(dict(steps=2.5), r"steps=2.5: expected an integer, got a number", id="steps-float"),
    pytest.param(dict(resume="false"), r"resume='false': expected true or false, got a string", id="resume-str"),
    pytest.param(dict(levels=3), r"levels=3: expected a list of integers, got an integer; write it as \[3\]",
                 id="levels-int"),
    pytest.param(dict(betas=0.9), r"betas=0.9: expected a list of numbers, got a number", id="betas-float"),
    pytest.param(dict(teacher=5), r"teacher=5: expected a string, got an integer", id="teacher-int"),
    pytest.param(dict(prompt_template="{prompt} {x}"),
                 r"prompt_template='\{prompt\} \{x\}': \{prompt\} must be its only field, got KeyError: 'x'; write a "
                 r"literal brace as \{\{ or \}\}", id="prompt_template-braces"),
    pytest.param(dict(prompt_template="{prompt} {0}"), r"prompt_template=.*IndexError", id="prompt_template-index"),
    pytest.param(dict(reward_timeout=-1.0), r"reward_timeout=-1.0: must be >= 0 seconds", id="reward_timeout"),
    pytest.param(dict(reward_errors="skip"), r"reward_errors='skip': choose one of fail, zero", id="reward_errors"),
])
def test_values_of_the_wrong_type_or_not_finite_are_refused(kw, msg):
    with pytest.raises(ValueError, match=rf"config: {msg}"):
        TrainConfig(**{"teacher": "preset:micro", **kw})


@pytest.mark.parametrize("text,msg", [
    pytest.param('steps: "3"\n', r"run.yaml:1: steps: '3': expected an integer, got a string; write the number "
                                 r"without quotes", id="steps-quoted"),
    pytest.param("algo: grpo\nsteps: 2.5\n", r"run.yaml:2: steps: 2.5: expected an integer, got a number",
                 id="steps-float"),
    pytest.param("steps: true\n", r"run.yaml:1: steps: True: expected an integer, got a boolean", id="steps-bool"),
    pytest.param("levels: 3\n", r"run.yaml:1: levels: 3: expected a list of integers", id="levels-scalar"),
    pytest.param("betas: 0.9\n", r"run.yaml:1: betas: 0.9: expected a list of numbers", id="betas-scalar"),
    pytest.param('resume: "false"\n', r"run.yaml:1: resume: 'false': expected true or false, got a string; write it "
                                      r"without quotes", id="resume-quoted"),
    pytest.param("lr: .nan\n", r"run.yaml:1: lr: nan: must be a finite number, got nan", id="lr-nan"),
    pytest.param('lr: "1e-4"\n', r"run.yaml:1: lr: '1e-4': expected a number, got a string", id="lr-quoted"),
    pytest.param("lr: 1e-4\nlr: 2e-4\n", r"run.yaml:2:1: invalid YAML: 'lr' is given twice \(first on line 1\)",
                 id="duplicate-key"),
    pytest.param("lr: [1\n", r"run.yaml:2:1: invalid YAML: expected ',' or ']', but got '<stream end>'",
                 id="syntax"),
    pytest.param("algo: grpo\nlr: -1e-4\n", r"run.yaml:2: config: lr=-0.0001: must be a positive number",
                 id="range-names-the-line"),
])
def test_yaml_is_read_strictly(tmp_path, text, msg):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg) as err:
        TrainConfig.from_yaml(p, {"teacher": "preset:micro"})
    assert "\n" not in str(err.value)


def test_yaml_numbers_in_scientific_notation_are_numbers(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("algo: grpo\nlr: 1e-4\nweight_decay: 1E-2\nkd_beta: 5.0e-3\nkd_beta_decay: .5e-5\nsteps: 3\n")
    cfg = TrainConfig.from_yaml(p)
    assert (cfg.lr, cfg.weight_decay, cfg.kd_beta, cfg.kd_beta_decay, cfg.steps) == (1e-4, 1e-2, 5e-3, 5e-6, 3)
    assert isinstance(cfg.steps, int)


def test_a_bad_value_in_yaml_is_refused_even_when_a_flag_overrides_it(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text('algo: grpo\nsteps: "3"\n')
    args = build_parser().parse_args(["train", "--config", str(p), "--steps", "4"])
    with pytest.raises(ValueError, match=r"run.yaml:2: steps: '3': expected an integer"):
        config_from_args(args)


def test_a_yaml_file_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"algo: grpo\nstudent: \"caf\xe9\"\n")
    with pytest.raises(ValueError, match=r"run.yaml:2: not valid UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        TrainConfig.from_yaml(p)


def test_cli_grad_clip_nan_is_refused(capsys):
    assert main(["train", "--algo", "grpo", "--grad-clip", "nan"]) == 2
    assert capsys.readouterr().err == "rlad train: error: config: grad_clip=nan: must be a finite number, got nan\n"


def test_help_states_the_mini_batch_split_and_the_run_dir_rules(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "split into exactly this many mini-batches (when they do not divide it, their sizes differ by one)" in out
    assert "--overwrite" in out and "--force-resume" in out and "--reward-timeout" in out and "--reward-errors" in out
    assert "An out-dir holding an earlier run is refused unless --resume true" in out


# ---------------------------------------------------------------- YAML 1.1 forms that read differently in YAML 1.2
@pytest.mark.parametrize("text,msg", [
    pytest.param("steps: 010\n", r"run.yaml:2:8: invalid YAML: 010 is ambiguous: YAML 1.1 reads a leading zero as "
                                 r"octal \(8\), YAML 1.2 as 10; write 8 or 10, or quote it \(\"010\"\) for the text",
                 id="octal"),
    pytest.param("steps: -007\n", r"run.yaml:2:8: invalid YAML: -007 is ambiguous: YAML 1.1 reads a leading zero",
                 id="octal-signed"),
    pytest.param("reward_timeout: 1:30\n", r"run.yaml:2:17: invalid YAML: 1:30 is ambiguous: YAML 1.1 reads it as the "
                                           r"base-60 number 90, YAML 1.2 as text; write 90, or quote it \(\"1:30\"\) "
                                           r"for the text", id="sexagesimal"),
    pytest.param("reward_timeout: 1:30.5\n", r"run.yaml:2:17: invalid YAML: 1:30.5 is ambiguous: YAML 1.1 reads it as "
                                             r"the base-60 number 90.5", id="sexagesimal-float"),
    pytest.param("steps: 1_000\n", r"run.yaml:2:8: invalid YAML: 1_000 is ambiguous: YAML 1.1 reads it as 1000 "
                                   r"\(underscores ignored\), YAML 1.2 as text; write 1000", id="underscore"),
    pytest.param("lr: 1_0.5e-4\n", r"run.yaml:2:5: invalid YAML: 1_0.5e-4 is ambiguous: YAML 1.1 reads it as 0.00105",
                 id="underscore-float"),
    pytest.param("steps: 0b101\n", r"run.yaml:2:8: invalid YAML: 0b101 is ambiguous: YAML 1.1 reads it as binary "
                                   r"\(5\), YAML 1.2 as text; write 5", id="binary"),
    pytest.param("resume: yes\n", r"run.yaml:2:9: invalid YAML: yes is ambiguous: YAML 1.1 reads it as true, YAML 1.2 "
                                  r"as text; write true, or quote it \(\"yes\"\) for the text", id="yes"),
    pytest.param("quiet: Off\n", r"run.yaml:2:8: invalid YAML: Off is ambiguous: YAML 1.1 reads it as false, YAML 1.2 "
                                 r"as text; write false", id="off"),
    pytest.param("levels: [1, 02]\n", r"run.yaml:2:13: invalid YAML: 02 is ambiguous", id="in-a-list"),
    pytest.param("on: 1\n", r"run.yaml:2:1: invalid YAML: on is ambiguous", id="key"),
])
def test_yaml_11_forms_that_yaml_12_reads_otherwise_are_refused_with_the_line(tmp_path, text, msg):
    """010 is 8 to PyYAML (YAML 1.1) and 10 to YAML 1.2 readers; 1:30 is 90; yes is true:
    refused with the file, line and column, and how to write the value plainly."""
    p = tmp_path / "run.yaml"
    p.write_text("algo: grpo\n" + text)
    with pytest.raises(ValueError, match=msg) as err:
        TrainConfig.from_yaml(p)
    assert "\n" not in str(err.value)


def test_yaml_plain_forms_are_read_as_before(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("algo: grpo\nlr: 3.0e-4\nweight_decay: 1e-5\nsteps: 40\nseed: 0\nwarmup_steps: +2\nresume: false\n"
                 "quiet: True\nteacher: null\nref: ~\ngrad_clip: 0.5\nkd_beta: .5\nentropy_coef: 0\n"
                 "student: '010'\ntokenizer: \"yes\"\nprompt_template: \"at 1:30 {prompt}\"\nlevels: [0, 1, 10]\n")
    cfg = TrainConfig.from_yaml(p)
    assert (cfg.lr, cfg.weight_decay, cfg.steps, cfg.seed, cfg.warmup_steps, cfg.resume, cfg.quiet) == \
        (3e-4, 1e-5, 40, 0, 2, False, True)
    assert (cfg.teacher, cfg.ref, cfg.grad_clip, cfg.kd_beta, cfg.entropy_coef) == (None, None, 0.5, 0.5, 0)
    assert (cfg.student, cfg.tokenizer, cfg.prompt_template, cfg.levels) == ("010", "yes", "at 1:30 {prompt}",
                                                                             [0, 1, 10])


def test_a_study_file_with_a_yaml_11_number_names_its_line(tmp_path):
    from rlad.study import load_study

    p = tmp_path / "study.yaml"
    p.write_text(f"out_dir: {tmp_path / 'out'}\nseeds: [0, 1]\nbase:\n  algo: grpo\n  student: preset:micro\n"
                 f"  eval_prompts: 010\narms:\n  a: {{}}\n")
    with pytest.raises(ValueError, match=r"study.yaml:6:17: invalid YAML: 010 is ambiguous"):
        load_study(p)


# ---------------------------------------------------------------- the temperature's range
@pytest.mark.parametrize("value", [1e-30, 1e-3, 0.0099, 101.0, 1e30])
def test_a_temperature_outside_the_range_of_meaningful_fp32_log_probs_is_refused(value):
    """--temperature 1e-30 was accepted, and the logged ratio was 2e8: logits / T in fp32 carry
    rounding of |logits| * 6e-8 / T nats, noise that a tiny T blows past the clip range."""
    with pytest.raises(ValueError, match=rf"config: temperature={re.escape(repr(value))}: must be in \[0.01, 100\] "
                                         rf"\(logits / temperature in float32"):
        TrainConfig(algo="grpo", temperature=value)


@pytest.mark.parametrize("value", [0.01, 0.7, 1.0, 100.0])
def test_temperatures_in_the_range_are_accepted(value):
    assert TrainConfig(algo="grpo", temperature=value).temperature == value


def test_rlad_eval_refuses_the_same_temperatures(capsys):
    assert main(["eval", "--model", "preset:micro", "--temperature", "1e-30", "--samples", "2"]) == 2
    assert capsys.readouterr().err.startswith("rlad eval: error: --temperature 1e-30: must be in [0.01, 100] (logits / "
                                              "temperature in float32")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sampling temperature, in [0.01, 100]" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    assert "in [0.01, 100]" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- eps_high: the RLAD paper's 0.28 for its settings
@pytest.mark.parametrize("kw,eps_high", [
    pytest.param(dict(algo="rlad", **TEACHER), 0.28, id="rlad"),
    pytest.param(dict(algo="kdrl", kd_variant="rlad_paper", **TEACHER), 0.28, id="kdrl-rlad_paper"),
    pytest.param(dict(algo="grpo"), 0.2, id="grpo"),
    pytest.param(dict(algo="kdrl", **TEACHER), 0.2, id="kdrl"),
    pytest.param(dict(algo="opd", opd_kind="sampled", **TEACHER), 0.2, id="opd"),
    pytest.param(dict(algo="sft", **TEACHER), 0.2, id="sft"),
    pytest.param(dict(algo="rlad", eps_high=0.2, **TEACHER), 0.2, id="rlad-explicit"),
    pytest.param(dict(algo="grpo", eps_high=0.28), 0.28, id="grpo-explicit"),
    pytest.param(dict(algo="rlad", eps_high=None, **TEACHER), 0.28, id="rlad-none"),
])
def test_eps_high_defaults_to_the_papers_for_its_settings(kw, eps_high):
    cfg = TrainConfig(**kw)
    assert cfg.eps_high == eps_high and cfg.to_dict()["eps_high"] == eps_high  # config.json holds the value used
    if cfg.policy_config(0) is not None:
        assert cfg.policy_config(0).eps_high == eps_high


def test_eps_high_default_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("--eps-high FLOAT clip range high: ratio <= 1 + eps_high (>= 0) (default: 0.28 with algo=rlad or kdrl's "
            "kd_variant=rlad_paper (the RLAD paper's clip, arXiv 2602.22495: 0.20 low / 0.28 high), 0.2 otherwise; "
            "config.json records the value used)") in out


def test_a_run_resumed_with_the_same_flags_has_the_same_eps_high(tmp_path, capsys):
    """config.json holds the resolved value; the same flags resolve to it again, so resuming is
    allowed. A run written when rlad's default was 0.2 (or a config.json without eps_high) is
    refused with the change named, unless resumed with --eps-high 0.2."""
    import json

    from rlad.checkpoint import resume_point
    from rlad.rundir import RunDirError

    flags = dict(algo="rlad", out_dir=str(tmp_path), **TEACHER)
    cfg = TrainConfig(**flags)
    saved = json.loads(json.dumps(cfg.to_dict()))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = TrainConfig(**flags, resume=True)
    assert again.resume_changes(saved) == []
    assert resume_point(again) is None  # no checkpoint yet: starts, its config.json accepted
    assert TrainConfig.from_dict(saved).eps_high == 0.28

    for old in ({**saved, "eps_high": 0.2}, {k: v for k, v in saved.items() if k != "eps_high"}):
        (tmp_path / "config.json").write_text(json.dumps(old))
        assert again.resume_changes(old) == ["eps_high: 0.2 -> 0.28"]
        with pytest.raises(RunDirError, match=r"eps_high: 0.2 -> 0.28"):
            resume_point(again)
        assert TrainConfig(**flags, resume=True, eps_high=0.2).resume_changes(old) == []


def test_a_run_written_before_chat_templates_resumes_with_them_off():
    """Its prompts were prompt_template alone: a config.json without chat_template counts as off,
    so resuming it under the new default (auto) names the change; with off it resumes."""
    flags = dict(algo="grpo")
    saved = {k: v for k, v in TrainConfig(**flags).to_dict().items() if k != "chat_template"}
    assert TrainConfig(**flags).resume_changes(saved) == ["chat_template: 'off' -> 'auto'"]
    assert TrainConfig(**flags, chat_template="off").resume_changes(saved) == []


def test_replace_keeps_a_resolved_eps_high():
    cfg = TrainConfig(algo="rlad", **TEACHER)
    assert cfg.replace(algo="grpo").eps_high == 0.28
    assert cfg.replace(algo="grpo", eps_high=None).eps_high == 0.2


@pytest.mark.parametrize("kw,msg", [
    pytest.param(dict(algo="kdrl", kd_variant="paper", **TEACHER), r"kd_variant='paper': choose one of recipe, "
                 r"rlad_paper", id="kd_variant"),
    pytest.param(dict(algo="kdrl", kd_variant="rlad_paper", ref_kl_coef=0.01, **TEACHER),
                 r"ref_kl_coef=0.01: kd_variant=rlad_paper puts the teacher in the reference-KL term", id="ref_kl"),
])
def test_kd_variant_is_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_the_task_help_names_every_builtin_task():
    from dataclasses import fields

    from rlad.tasks import BUILTIN

    help_text = next(f.metadata["help"] for f in fields(TrainConfig) if f.name == "task")
    assert all(name in help_text for name in BUILTIN), (sorted(BUILTIN), help_text)
