"""GGUF checkpoints wherever a model is accepted (``rlad.gguf``).

A tiny Llama-shaped GGUF is written here with the ``gguf`` package (F32 tensors, llama.cpp's
names and q / k row order, the built-in tokenizer as a byte-level BPE vocabulary in its metadata:
``helpers.write_tiny_gguf``), so nothing is downloaded. The reference is the same weights as a
``transformers`` model: the file must load as exactly that model, by its path or by a folder
holding it, and then pass the preflight, train, save a checkpoint and evaluate like any folder.
"""

import json
import shutil

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf; it is in rlad[train])")

from rlad.cli import main  # noqa: E402
from rlad.gguf import gguf_source, is_gguf  # noqa: E402
from rlad.models import check_model_path, context_length, load_model, model_config, vocab_size  # noqa: E402
from rlad.preflight import preflight  # noqa: E402
from rlad.runtime import tokenizer_for  # noqa: E402
from rlad.tokenizer import carries_tokenizer, load_tokenizer, tokenizer_mismatch  # noqa: E402

from helpers import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder holding one tiny GGUF (``file``), the reference model with its weights, and an
    ordinary ``save_pretrained`` folder of that model with the file's tokenizer (``plain``)."""
    root = tmp_path_factory.mktemp("gguf")
    (root / "model").mkdir()
    file = root / "model" / "tiny.gguf"
    ref = write_tiny_gguf(file)
    ref.save_pretrained(root / "plain")
    load_tokenizer(file).save_pretrained(root / "plain")
    return {"file": str(file), "folder": str(root / "model"), "plain": str(root / "plain"), "ref": ref}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_gguf_loads_as_the_same_weights(tmp_path, tie):
    """By its path and by a folder holding it: the logits of the model written into the file."""
    file = tmp_path / "m.gguf"
    ref = write_tiny_gguf(file, seed=3, tie=tie)
    tok = load_tokenizer(file)
    ids = torch.randint(0, len(tok), (2, 23), generator=torch.Generator().manual_seed(0))
    expected = _logits(ref, ids)
    for spec in (str(file), str(tmp_path)):
        model = load_model(spec, tok, dtype=torch.float32)
        assert model.config.tie_word_embeddings == tie
        assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
        torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)
    # dequantized straight to the run's dtype: the same rounding as casting the float32 model
    bf16 = load_model(str(file), tok, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(_logits(bf16, ids), _logits(ref.to(torch.bfloat16), ids), rtol=0, atol=0)


def test_config_and_tokenizer_come_from_the_file(tiny):
    for spec in (tiny["file"], tiny["folder"]):
        config = model_config(spec, None, role="student")
        assert vocab_size(config) == tiny["ref"].config.vocab_size
        assert context_length(config) == 256
        tok = tokenizer_for(spec)
        assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>" and tok.padding_side == "left"
        assert len(tok) == tiny["ref"].config.vocab_size
        assert carries_tokenizer(spec) and is_gguf(spec)
    # the built-in tokenizer's ids: the GGUF keeps every one (and adds <|endoftext|>, see write_tiny_gguf)
    builtin, own = load_tokenizer(), load_tokenizer(tiny["file"])
    assert all(own.convert_tokens_to_ids(t) == i for t, i in builtin.get_vocab().items())
    # the folder saved from it holds the same tokenizer
    assert tokenizer_mismatch(own, load_tokenizer(tiny["plain"])) is None


def test_which_paths_name_a_gguf(tiny, tmp_path):
    assert gguf_source(tiny["file"]).path.name == "tiny.gguf"
    assert gguf_source(tiny["folder"]).folder == tiny["folder"]
    assert gguf_source(tiny["plain"]) is None  # an ordinary folder
    for spec in ("preset:micro", "config:x.json", "HuggingFaceTB/SmolLM2-135M", str(tmp_path / "missing.gguf")):
        assert gguf_source(spec) is None
    # a folder with config.json is an ordinary folder, even with a .gguf beside it
    beside = tmp_path / "beside"
    shutil.copytree(tiny["plain"], beside)
    shutil.copy(tiny["file"], beside / "x.gguf")
    assert gguf_source(str(beside)) is None


def test_a_folder_with_several_gguf_files_is_refused_in_one_line(tiny, tmp_path, capsys):
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny["file"], two / name)
    match = r"folder '.*two' holds 2 .gguf files \(a.gguf, b.gguf\); name the one to load: .*two/a.gguf"
    with pytest.raises(ValueError, match="student: " + match):
        check_model_path(str(two), "student")
    with pytest.raises(ValueError, match="tokenizer.*" + match):
        load_tokenizer(two)
    assert main(["eval", "--model", str(two), "--task", "echo", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 .gguf files" in err
    # a file that is no GGUF: one line naming it
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match=r"student: cannot read the GGUF '.*bad.gguf': .*"):
        model_config(str(tmp_path / "bad.gguf"), None, role="student")


def test_without_the_gguf_package_the_error_says_how_to_install_it(tiny, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match=r"student: '.*tiny.gguf' is a GGUF file, which transformers reads with the "
                                         r"gguf package\(s\); install them: pip install gguf"):
        model_config(tiny["file"], None, role="student")


def test_a_loaded_gguf_saves_as_an_ordinary_folder(tiny, tmp_path):
    """save_pretrained refuses a model "quantized with gguf"; the loaded model carries no trace of it."""
    tok = load_tokenizer(tiny["file"])
    model = load_model(tiny["file"], tok)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    again = load_model(str(tmp_path / "saved"), tok)
    ids = torch.arange(3, 40).unsqueeze(0)
    torch.testing.assert_close(_logits(again, ids), _logits(tiny["ref"], ids), rtol=0, atol=0)


def test_preflight_accepts_gguf_models_and_compares_their_tokenizers(tiny, tiny_config, capsys):
    """A GGUF student; a GGUF teacher and reference beside its saved folder (the same tokenizer);
    a GGUF teacher of a run with another tokenizer is compared and refused, not assumed to share it."""
    setup = preflight(tiny_config(student=tiny["file"]))
    assert len(setup.tok) == tiny["ref"].config.vocab_size
    setup = preflight(tiny_config(algo="rlad", student=tiny["plain"], teacher=tiny["folder"], ref=tiny["file"],
                                  ref_kl_coef=0.1))
    assert "assumed to share" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"config: teacher: the tokenizer of the teacher '.*tiny.gguf' differs from "
                                         r"the run's tokenizer .*built-in.*: the run's has 399 tokens, the teacher's "
                                         r"400; 1 token\(s\) only in the teacher's, e.g. '<\|endoftext\|>'"):
        preflight(tiny_config(algo="rlad", student="preset:micro", teacher=tiny["file"]))


def test_rlad_train_and_eval_with_a_gguf_student(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--algo", "grpo", "--student", tiny["folder"], "--task", "echo", "--levels", "1",
                 "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                 "--micro-batch-size", "8", "--mini-batches", "1", "--eval-prompts", "2", "--eval-every", "0",
                 "--save-every", "1", "--quiet", "true", "--threads", "1", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    saved = out / "checkpoints" / "step_000001" / "model"
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(saved)  # plain transformers loads the checkpoint
    assert trained.config.vocab_size == tiny["ref"].config.vocab_size
    capsys.readouterr()
    assert main(["eval", "--model", tiny["file"], "--task", "echo", "--levels", "1", "--prompts", "2", "--samples",
                 "0", "--quiet", "--max-new-tokens", "4"]) == 0
    assert "| all | 2 |" in capsys.readouterr().out


def test_trl_teacher_from_a_gguf(tiny, tmp_path):
    """RLADTrainer's teacher_model: a .gguf path, loaded dense in the student's dtype, with its tokenizer."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from rlad.integrations.trl import RLADConfig, RLADTrainer

    tok = load_tokenizer(tiny["plain"])
    args = RLADConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=4, save_strategy="no", rlad_impl="torch",
                      disable_tqdm=True, bf16=False, teacher_model=tiny["file"])
    trainer = RLADTrainer(tiny["plain"], lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": ["Echo 1.", "Echo 2."]}),
                          processing_class=tok)
    teacher = trainer.teacher
    assert getattr(teacher, "hf_quantizer", None) is None
    for (name, p), q in zip(teacher.named_parameters(), tiny["ref"].parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p.cpu(), q), name
