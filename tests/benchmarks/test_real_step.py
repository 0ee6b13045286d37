"""benchmarks.real_step at a tiny size, so that it cannot rot: both rlad sides and TRL's run in
their own processes, and the table and JSON hold every phase, the peak memory and the ratio."""

import json

from benchmarks import real_step
from rlad.models import load_model
from rlad.tokenizer import load_tokenizer


def test_a_tiny_run_writes_its_phases_and_the_trl_ratio(tmp_path):
    tok = load_tokenizer()
    for name, preset in (("student", "preset:micro"), ("teacher", "preset:tiny-student")):
        load_model(preset, tok, seed=0).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    assert real_step.main(["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                           "--task", "echo", "--levels", "1", "--prompts", "2", "--group-size", "2",
                           "--max-new-tokens", "4", "--steps", "1", "--eval-prompts", "2", "--threads", "1",
                           "--out", str(out)]) == 0
    res = json.loads((out / "real_step.json").read_text())
    for side in ("grpo", "rlad"):
        assert res[side]["generate_s"] > 0 and res[side]["update_s"] > 0 and res[side]["peak_rss_mb"] > 50
        assert res[side]["step_s"] >= res[side]["generate_s"] + res[side]["update_s"]
    assert res["grpo"]["score_teacher_s"] is None and res["rlad"]["score_teacher_s"] > 0
    assert res["trl"]["step_s"] > 0 and len(res["trl"]["batch_s"]) == 2 and res["trl"]["response_len"] > 0
    assert res["trl_over_rlad_grpo"] == res["trl"]["step_s"] / res["grpo"]["step_s"]
    md = (out / "real_step.md").read_text()
    assert "| rlad `--algo rlad` |" in md and "| TRL `GRPOTrainer` |" in md and "commit" in md
