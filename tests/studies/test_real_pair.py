"""The real-pair scripts (studies/real_pair): both shell scripts parse, and summary.py builds its
table from the runs' metrics files alone (hand-written here): the teacher, the student before RL
(the first run's step-0 evaluation) and after each run, with standard errors per level, the
per-step signals, and a verdict on the change that follows the standard errors."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "studies" / "real_pair"


def _summary():
    spec = importlib.util.spec_from_file_location("real_pair_summary", ROOT / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["run.sh", "quick.sh"])
def test_the_scripts_parse(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    subprocess.run([bash, "-n", str(ROOT / script)], check=True)


def _eval(step, mean, se, greedy=0.5):
    rec = {"eval": True, "step": step, "eval/n": 8.0, "eval/n/L1": 4.0, "eval/n/L2": 4.0,
           "eval/accuracy": greedy, "eval/accuracy_se": 0.1, "eval/mean@4": mean, "eval/mean@4_se": se}
    for lv in (1, 2):
        rec |= {f"eval/accuracy/L{lv}": greedy, f"eval/accuracy_se/L{lv}": 0.1,
                f"eval/mean@4/L{lv}": mean + (0.1 if lv == 1 else -0.1), f"eval/mean@4_se/L{lv}": se * 1.4}
    return rec


def _run(folder: Path, before: float, after: float, se: float):
    folder.mkdir(parents=True)
    steps = [{"step": s, "reward": 0.1 * s, "grad_norm": 0.5, "groups_equal_frac": 0.25, "step_s": 20.0}
             for s in (1, 2)]
    lines = [_eval(0, before, se), *steps, _eval(2, after, se)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_summary_table_and_verdict(tmp_path, capsys):
    teacher = {k.removeprefix("eval/"): v for k, v in _eval(0, 0.7, 0.05, greedy=0.75).items()}
    (tmp_path / "eval-teacher.json").write_text(json.dumps(teacher))
    _run(tmp_path / "rlad", 0.20, 0.22, 0.03)   # +0.02, within the standard errors
    _run(tmp_path / "grpo", 0.20, 0.40, 0.03)   # +0.20, far beyond them
    assert _summary().main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| model | greedy accuracy | mean@4 | mean@4 L1 | mean@4 L2 |" in out
    assert "| teacher | 0.750 ± 0.100 | 0.700 ± 0.050 | 0.800 ± 0.070 | 0.600 ± 0.070 |" in out
    assert "| student, before RL | 0.500 ± 0.100 | 0.200 ± 0.030 | 0.300 ± 0.042 | 0.100 ± 0.042 |" in out
    assert "| student after 2 steps of rlad | 0.500 ± 0.100 | 0.220 ± 0.030 |" in out
    assert "| student after 2 steps of grpo | 0.500 ± 0.100 | 0.400 ± 0.030 |" in out
    assert "rlad: reward by step 0.10 0.20; gradient norm 0.50 0.50" in out
    assert "rlad: mean@4 +0.020 (standard error 0.042): within noise" in out
    assert "grpo: mean@4 +0.200 (standard error 0.042): beyond twice its standard error" in out


def test_summary_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert _summary().main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("summary: missing") and err.count("\n") == 1
