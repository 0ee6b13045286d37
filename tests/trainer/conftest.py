"""Fixtures shared by the trainer tests: the tokenizer, and a trained teacher / student pair
(built once per session, ~8 s)."""

import pytest

from rlad.demo import ProseStyle, sft_on_solutions
from rlad.models import load_model
from rlad.tasks import Echo
from rlad.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="session")
def models(tmp_path_factory, tok):
    """A teacher that solves echo, and a student that knows the digits but writes half of its
    answers in a form the verifier cannot read (so rewards are mixed and RL has signal).
    Paths to ``save_pretrained`` folders (with the tokenizer): tests load their own copies."""
    root = tmp_path_factory.mktemp("models")
    task = Echo()
    teacher = load_model("preset:tiny-student", tok, seed=1)
    sft_on_solutions(teacher, tok, task, [1], steps=300, batch=32, lr=3e-3, seed=3, desc="teacher", quiet=True)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = load_model("preset:tiny-student", tok, seed=2)
    sft_on_solutions(student, tok, ProseStyle(task, 0.5), [1], steps=300, batch=32, lr=3e-3, seed=4,
                     desc="student", quiet=True)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return {"teacher": str(root / "teacher"), "student": str(root / "student")}


@pytest.fixture
def tiny_config(tmp_path):
    """A factory of TrainConfigs for the smallest real run (untrained ``preset:micro`` student,
    grpo on echo, 2 steps of 4 sequences, a checkpoint per step) in ``tmp_path / "run"``:
    ``tiny_config(steps=4)`` overrides a setting."""
    from rlad.config import TrainConfig

    def make(**kw):
        base = dict(out_dir=str(tmp_path / "run"), algo="grpo", student="preset:micro", task="echo", levels=[1],
                    steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, micro_batch_size=8, mini_batches=1,
                    eval_prompts=2, eval_every=0, save_every=1, quiet=True, threads=1)
        base.update(kw)
        return TrainConfig(**base)

    return make
