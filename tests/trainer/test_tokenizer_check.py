"""A teacher (or reference model) must use the run's tokenizer: the same id for every token and
the same special tokens. A folder saved with another tokenizer is refused before any model is
loaded, with an error naming both tokenizers."""

import json
import re

import pytest

from rlad.launch import train
from rlad.models import load_model
from rlad.preflight import preflight
from rlad.tokenizer import ASSET, load_tokenizer, tokenizer_mismatch


def _save(folder, tok, vocab=None):
    """A micro model saved in ``folder`` with ``tok``'s files (or none: ``tok=None``)."""
    model = load_model("preset:micro", vocab or load_tokenizer(), seed=0)
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    return str(folder)


def _swapped(tmp_path):
    """The built-in tokenizer with the ids of two tokens swapped (same tokens, same size)."""
    data = json.loads((ASSET / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "Echo", "####"
    assert a in vocab and b in vocab
    vocab[a], vocab[b] = vocab[b], vocab[a]
    folder = tmp_path / "swapped_tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text((ASSET / "tokenizer_config.json").read_text())
    return load_tokenizer(folder)


def _marked_special(tmp_path):
    """The built-in tokenizer with an existing token, '####', declared a special token: the same
    ids for the same tokens, but other special tokens."""
    data = json.loads((ASSET / "tokenizer.json").read_text())
    i = data["model"]["vocab"]["####"]
    data["added_tokens"].append({"id": i, "content": "####", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    folder = tmp_path / "marked_tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text((ASSET / "tokenizer_config.json").read_text())
    return load_tokenizer(folder)


def _extra_token():
    tok = load_tokenizer()
    tok.add_tokens(["<think>"])
    return tok


def _other_eos():
    tok = load_tokenizer()
    tok.eos_token = "<unk>"
    return tok


def _extra_special():
    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    return tok


def test_the_comparison_finds_each_difference(tmp_path):
    tok = load_tokenizer()
    assert tokenizer_mismatch(tok, load_tokenizer()) is None
    swapped = _swapped(tmp_path)
    assert len(swapped) == len(tok)
    assert tokenizer_mismatch(tok, swapped, ("A", "B")) == (
        f"2 token(s) have other ids, e.g. {min(('Echo', '####'), key=tok.get_vocab().get)!r} is "
        f"{min(tok.get_vocab()['Echo'], tok.get_vocab()['####'])} in A and "
        f"{max(tok.get_vocab()['Echo'], tok.get_vocab()['####'])} in B")
    assert tokenizer_mismatch(tok, _extra_token(), ("A", "B")) == \
        f"A has {len(tok)} tokens, B {len(tok) + 1}; 1 token(s) only in B, e.g. '<think>' (id {len(tok)})"
    marked = _marked_special(tmp_path)
    assert marked.get_vocab() == tok.get_vocab()
    assert tokenizer_mismatch(tok, marked, ("A", "B")) == \
        f"their special tokens differ: 1 difference(s), e.g. '####' (id {tok.get_vocab()['####']}) is special only in B"
    eos = tok.convert_tokens_to_ids("<eos>")
    unk = tok.convert_tokens_to_ids("<unk>")
    assert tokenizer_mismatch(tok, _other_eos(), ("A", "B")) == \
        f"eos_token is '<eos>' (id {eos}) in A and '<unk>' (id {unk}) in B"


REFUSED = [
    pytest.param(lambda t: _swapped(t), r"2 token\(s\) have other ids", id="ids-swapped"),
    pytest.param(lambda t: _extra_token(), r"1 token\(s\) only in the teacher's, e.g. '<think>'", id="token-added"),
    pytest.param(lambda t: _other_eos(), r"eos_token is '<eos>' \(id \d+\) in the run's and '<unk>'",
                 id="other-eos"),
    pytest.param(lambda t: _extra_special(), r"'<\|im_end\|>'", id="special-added"),
    pytest.param(lambda t: _marked_special(t), r"their special tokens differ: .* is special only in the teacher's",
                 id="token-made-special"),
]


@pytest.mark.parametrize("make,detail", REFUSED)
def test_a_teacher_with_another_tokenizer_is_refused_before_any_model_is_loaded(tmp_path, tiny_config, monkeypatch,
                                                                                 make, detail):
    teacher = _save(tmp_path / "teacher", make(tmp_path))
    cfg = tiny_config(algo="rlad", teacher=teacher)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the checks were done")

    monkeypatch.setattr("rlad.models.load_model", no_model)
    with pytest.raises(ValueError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"config: teacher: the tokenizer of the teacher {teacher!r} differs from the run's "
                          f"tokenizer the built-in tokenizer ({ASSET}): ")
    assert re.search(detail, msg), msg
    assert not (tmp_path / "run").exists()


def test_student_and_teacher_folders_are_both_named(tmp_path, tiny_config):
    student = _save(tmp_path / "student", load_tokenizer())
    teacher = _save(tmp_path / "teacher", _extra_token())
    with pytest.raises(ValueError, match=f"the tokenizer of the teacher '{teacher}' differs from the run's tokenizer "
                                         f"'{student}' \\(the student's\\)"):
        preflight(tiny_config(algo="kdrl", student=student, teacher=teacher))


def test_a_reference_model_with_another_tokenizer_is_refused(tmp_path, tiny_config):
    ref = _save(tmp_path / "ref", _other_eos())
    with pytest.raises(ValueError, match=f"config: ref: the tokenizer of the ref '{ref}' differs"):
        preflight(tiny_config(algo="grpo", ref=ref, ref_kl_coef=0.1))
    preflight(tiny_config(algo="grpo", ref=ref, ref_kl_coef=0.0))  # not loaded without the KL term: not checked


def test_the_same_tokenizer_passes_and_trains(tmp_path, tiny_config):
    teacher = _save(tmp_path / "teacher", load_tokenizer())
    summary = train(tiny_config(algo="rlad", teacher=teacher, steps=1))
    assert summary["steps"] == 1


def test_a_folder_without_tokenizer_files_is_assumed_to_share_it(tmp_path, tiny_config, capsys):
    teacher = _save(tmp_path / "teacher", None)
    preflight(tiny_config(algo="rlad", teacher=teacher))
    assert f"note: teacher '{teacher}' has no tokenizer files" in capsys.readouterr().out
    # its vocabulary size is still checked when it is loaded: a smaller head is refused
    small = load_tokenizer()
    small_model = load_model("preset:micro", small, seed=0)
    small_model.resize_token_embeddings(100)
    small_model.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(100\) is smaller than the student's"):
        train(tiny_config(algo="rlad", teacher=str(tmp_path / "small"), steps=1))
