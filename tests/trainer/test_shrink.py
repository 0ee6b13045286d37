"""``rlad drop-layers``: a model with decoder layers removed computes exactly what the original
computes with those layers skipped; the block chosen is the one the angular distance names."""

import json
import math

import pytest
import torch

from rlad.cli import main
from rlad.models import load_model
from rlad.shrink import MARKER, ShrinkError, block_distances, choose_block, decoder_layers, drop_layers, parse_layers
from rlad.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def model(tok):
    return load_model("preset:tiny-teacher", tok, seed=0).eval()  # 4 layers


def _ids(tok):
    rows = tok(["Compute 1+2. #### 3", "Echo 12."], add_special_tokens=False)["input_ids"]
    P = max(map(len, rows))
    ids = torch.full((2, P), tok.pad_token_id)
    mask = torch.zeros((2, P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], mask[i, P - len(r):] = torch.tensor(r), 1
    return ids, mask


class Skip(torch.nn.Module):
    """A decoder layer that passes its hidden state through: the original model with it skipped."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_the_cut_model_is_the_original_with_those_layers_skipped(model, tok):
    ids, mask = _ids(tok)
    skipped = load_model("preset:tiny-teacher", tok, seed=0).eval()
    for i in (1, 2):
        skipped.model.layers[i] = Skip()
    drop_layers(model, [1, 2])
    assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2
    assert [m.self_attn.layer_idx for m in decoder_layers(model)] == [0, 1]
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ref = skipped(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, ref)


def test_the_cut_model_generates_with_its_kv_cache(model, tok):
    """Renumbered layers index the cache from 0: generation with the cache equals without it."""
    ids, mask = _ids(tok)
    drop_layers(model, [0, 2])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(**kw, use_cache=True), model.generate(**kw, use_cache=False))


def test_block_distances_are_the_angular_distances_of_the_hidden_states(model, tok):
    """Against transformers' own ``output_hidden_states`` (entry l is what enters layer l) and the
    formula arccos(cos) / pi averaged over the real tokens, in float64."""
    ids, mask = _ids(tok)
    n = 2
    ours = block_distances(model, [(ids, mask)], n)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    L = len(decoder_layers(model))
    assert len(ours) == L - n + 1
    for s in range(L - n):  # the blocks that end before the last layer (whose output the model norms)
        a, b = hs[s][real].double(), hs[s + n][real].double()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        expected = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
        assert ours[s] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_block_keeps_the_first_and_the_last_layer():
    assert choose_block([0.0, 0.3, 0.1, 0.2, 0.0], 2, 6) == 2  # starts 0 and 4 would drop an end layer
    assert choose_block([0.5, 0.2, 0.2, 0.9], 2, 5) == 1  # the earliest of a tie
    with pytest.raises(ShrinkError, match="keep at least 2 layers"):
        choose_block([0.1], 4, 4)


def test_layer_specs():
    assert parse_layers(["3", "10-12"], 30) == [3, 10, 11, 12]
    assert parse_layers(["1,2"], 4) == [1, 2]
    for spec, msg in ((["30"], "the model has layers 0-29"), (["a"], "give layer numbers"), (["2", "1-3"], "twice")):
        with pytest.raises(ShrinkError, match=msg):
            parse_layers(spec, 30)


def test_the_command_writes_a_folder_that_loads(tmp_path, tok, capsys):
    src = tmp_path / "src"
    load_model("preset:tiny-teacher", tok, seed=0).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "small"
    assert main(["drop-layers", str(src), "--out", str(out), "--keep", "2", "--task", "echo", "--calibration",
                 "8"]) == 0
    record = json.loads((out / MARKER).read_text())
    assert record["kept"] == [0, 3] and record["dropped"] == [1, 2] and set(record["block_distances"]) == {"0", "1",
                                                                                                           "2"}
    small = load_model(str(out), load_tokenizer(out))
    assert small.config.num_hidden_layers == 2
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    assert "dropped layers 1-2 of 4" in capsys.readouterr().out

    # the folder is never written over unless it is an earlier one of these, with --overwrite
    assert main(["drop-layers", str(src), "--out", str(out), "--drop", "1"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["drop-layers", str(src), "--out", str(out), "--drop", "1", "--overwrite"]) == 0
    assert json.loads((out / MARKER).read_text())["kept"] == [0, 2, 3]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["drop-layers", str(src), "--out", str(other), "--drop", "1", "--overwrite"]) == 2
    assert "rlad never deletes what it did not write" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    assert main(["drop-layers", str(src), "--out", str(src / "inner"), "--keep", "2", "--select", "last"]) == 2
    assert "inside the model" in capsys.readouterr().err
    assert main(["drop-layers", str(src), "--out", str(tmp_path / "x"), "--keep", "4"]) == 2
    assert "keep between 1 and 3" in capsys.readouterr().err
