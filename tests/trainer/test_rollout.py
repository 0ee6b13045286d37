"""Rollouts: the trainer's per-token log-probs are the sampler's, targets line up with tokens,
evaluation metrics, and the ``rlad eval`` command."""

import random
from math import comb

import pytest
import torch

from rlad.cli import main
from rlad.evaluate import pass_at_k
from rlad.models import load_model
from rlad.rollout import IGNORE, Rollout, assemble, encode_prompts, from_pairs, positions, response_lengths, score
from rlad.tasks import Arithmetic


def test_old_logprobs_equal_the_samplers(tok):
    """Recomputed log-probs (fused op, same temperature) equal what ``generate`` sampled from."""
    torch.manual_seed(0)
    model = load_model("preset:tiny-student", tok, seed=3).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # a peaked distribution
    exs = Arithmetic().sample(random.Random(5), 3, [1, 2])
    ids, mask = encode_prompts(tok, [e.prompt for e in exs], "{prompt}\n", "cpu")
    T = 0.7
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=T,
                         top_p=1.0, top_k=0, num_return_sequences=2, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)
    P = ids.shape[1]
    resp = out.sequences[:, P:]
    sampler = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, resp[..., None])[..., 0]
    lengths, _ = response_lengths(resp, tok.eos_token_id)
    inp, am, tg = assemble(ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), resp, lengths, tok.pad_token_id)
    roll = Rollout(inp, am, positions(am), tg, exs, [""] * len(inp), torch.zeros(len(inp)), 2)
    ours = score(model, roll, temperature=T, micro_batch=4)[:, P - 1:]
    m = roll.response_mask[:, P - 1:]
    assert m.sum() > 10
    torch.testing.assert_close(ours[m], sampler[m], rtol=0, atol=1e-4)


def test_select_cuts_every_per_row_field():
    """A micro-batch keeps its rows of every tensor field (the typed per-token ones included), its
    texts, and the per-group fields whole; unset fields stay unset."""
    g = torch.Generator().manual_seed(0)
    B, L = 6, 5
    exs = Arithmetic().sample(random.Random(0), 3, [1])
    ids = torch.randint(0, 50, (B, L), generator=g)
    roll = Rollout(ids, torch.ones_like(ids), positions(torch.ones_like(ids)), ids[:, 1:].clone(), exs,
                   [f"t{i}" for i in range(B)], torch.rand(B, generator=g), 2,
                   old_logp=torch.randn(B, L - 1, generator=g), teacher_logp=torch.randn(B, L - 1, generator=g),
                   advantages=torch.randn(B, generator=g), token_advantages=torch.randn(B, L - 1, generator=g),
                   kd_weights=torch.rand(B, L - 1, generator=g))
    idx = torch.tensor([4, 1, 2])
    mb = roll.select(idx)
    for name in ("input_ids", "attention_mask", "position_ids", "targets", "rewards", "old_logp", "teacher_logp",
                 "advantages", "token_advantages", "kd_weights"):
        assert torch.equal(getattr(mb, name), getattr(roll, name)[idx]), name
    assert mb.ref_logp is None
    assert mb.texts == ["t4", "t1", "t2"] and mb.examples is roll.examples and mb.group_size == 2
    assert torch.equal(mb.token_advantage(), roll.token_advantages[idx])
    mb.token_advantages = None  # without per-token advantages, each response's advantage on all its positions
    assert torch.equal(mb.token_advantage(), roll.advantages[idx][:, None].expand(3, L - 1))


def test_assemble_cuts_at_eos_and_aligns_targets():
    pad, eos = 0, 2
    prompt = torch.tensor([[pad, 5, 6], [7, 8, 9]])
    pmask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    resp = torch.tensor([[11, eos, 13], [14, 15, 16]])  # row 0 ends early; row 1 hits the length limit
    lengths, ended = response_lengths(resp, eos)
    assert lengths.tolist() == [2, 3] and ended.tolist() == [True, False]
    ids, am, tg = assemble(prompt, pmask, resp, lengths, pad)
    assert ids.tolist() == [[pad, 5, 6, 11, eos, pad], [7, 8, 9, 14, 15, 16]]
    assert am.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # targets[j] is the token at j + 1 when it is part of the response
    assert tg.tolist() == [[IGNORE, IGNORE, 11, eos, IGNORE], [IGNORE, IGNORE, 14, 15, 16]]
    assert positions(am).tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5]]


def test_from_pairs_scores_the_given_solution(tok):
    ex = Arithmetic().make(random.Random(1), 2)
    roll = from_pairs(tok, [ex], [ex.solution], Arithmetic(), template="{prompt}\n", device="cpu")
    text = tok.decode(roll.input_ids[0][roll.response_mask[0].nonzero().flatten() + 1], skip_special_tokens=True)
    assert text == ex.solution and roll.rewards.item() == 1.0


def test_pass_at_k_matches_its_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 4), (8, 0, 2), (5, 5, 5), (6, 2, 5)]:
        expected = 1 - comb(n - c, k) / comb(n, k) if n - c >= k else 1.0
        assert abs(pass_at_k(n, c, k) - expected) < 1e-12
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_eval_command(tmp_path, tok, capsys):
    model = load_model("preset:micro", tok, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc = main(["eval", "--model", str(tmp_path / "m"), "--task", "arithmetic", "--levels", "1", "2", "--prompts", "6",
               "--samples", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "res.json"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| level 1 |" in out and "| level 2 |" in out and "pass@2" in out
    assert (tmp_path / "res.json").is_file()


def test_eval_writes_every_response(tmp_path, tok, capsys):
    """--responses: one JSON line per response (greedy and sampled), whose rewards give the metrics
    printed; an output file inside the model's folder, or a folder, is refused before any work."""
    import json

    model = load_model("preset:micro", tok, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    common = ["eval", "--model", str(tmp_path / "m"), "--task", "echo", "--levels", "1", "--prompts", "5",
              "--samples", "3", "--max-new-tokens", "4", "--quiet", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "res.json"), "--responses", str(tmp_path / "r.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    res = json.loads((tmp_path / "res.json").read_text())
    assert [r["kind"] for r in rows].count("greedy") == 5 and [r["kind"] for r in rows].count("sample") == 15
    assert {r["prompt"] for r in rows} == {r["prompt"] for r in rows if r["kind"] == "greedy"}
    greedy = [r["reward"] >= 1 for r in rows if r["kind"] == "greedy"]
    assert sum(greedy) / 5 == pytest.approx(res["accuracy"])
    sampled = [r["reward"] >= 1 for r in rows if r["kind"] == "sample"]
    assert sum(sampled) / 15 == pytest.approx(res["mean@3"])
    assert all(set(r) == {"prompt", "level", "answer", "kind", "response", "reward", "truncated"} for r in rows)
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert main(common + ["--responses", str(tmp_path / "m" / "config.json")]) == 2
    assert "is inside the model" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert main(common + ["--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "nope" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- user text cannot inject special tokens
def test_special_token_text_in_a_prompt_stays_text(tok):
    """``<eos>``, ``<pad>``, ``<bos>``, ``<unk>`` written in prompt text are encoded as text, as
    ``split_special_tokens`` does; the template's own special tokens stay special; a prompt with
    no such text is tokenized exactly as before (with its template, in one piece)."""
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    prompts = ["Echo <eos> 12.<pad>", "say <bos><unk>", "Echo 12."]
    ids, mask = encode_prompts(tok, prompts, "{prompt}\n", "cpu")
    for row, m, p in zip(ids, mask, prompts, strict=True):
        body = row[m.bool()].tolist()
        assert body[0] == tok.bos_token_id and not specials & set(body[1:]), (p, body)
        assert tok.decode(body[1:]) == p + "\n"
    plain = tok("Echo 12.\n", add_special_tokens=False)["input_ids"]
    assert ids[2][mask[2].bool()].tolist() == [tok.bos_token_id, *plain]
    ids, mask = encode_prompts(tok, ["a <eos> b"], "Q: {prompt}<eos>A:", "cpu")
    body = ids[0][mask[0].bool()].tolist()
    assert body.count(tok.eos_token_id) == 1 and tok.decode(body[1:]) == "Q: a <eos> b<eos>A:"


def test_special_token_text_in_a_response_stays_text(tok):
    """Teacher solutions re-encoded for sft: a literal ``<eos>`` in their text does not end them early."""
    exs = Arithmetic().sample(random.Random(0), 1, [1])
    roll = from_pairs(tok, exs, ["1+2=3 <eos> #### 3"], None, template="{prompt}\n", device="cpu")
    response = roll.targets[roll.response_mask].tolist()
    assert response.count(tok.eos_token_id) == 1 and response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]) == "1+2=3 <eos> #### 3"


# ---------------------------------------------------------------- the model's context
def test_a_prompt_beyond_the_models_context_is_refused(tok):
    """Llama's rotary positions would silently extrapolate past max_position_embeddings (GPT-2's
    learned ones raise an IndexError): generate refuses first, naming the numbers and the prompt."""
    from transformers import AutoModelForCausalLM

    from rlad.models import preset_config
    from rlad.rollout import generate

    model = AutoModelForCausalLM.from_config(preset_config("micro", len(tok), max_positions=16))
    exs = Arithmetic().sample(random.Random(0), 2, [5])
    with pytest.raises(ValueError, match=r"max_new_tokens=8: a prompt of \d+ tokens plus the response exceeds the 16 "
                                         r"positions of the model .*: 'Compute .*'; lower max_new_tokens or shorten"):
        generate(model, tok, exs, Arithmetic(), group_size=2, temperature=1.0, top_p=1.0, max_new_tokens=8,
                 template="{prompt}\n")


def test_eval_of_a_missing_model_folder_is_one_line(capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"rlad eval: error: --model: model folder '{tmp_path / 'nope'}' not found\n"


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_scores_follow_the_models_logit_map(tok, family):
    """Models that soft-cap (Gemma 2) or scale (Cohere) their logits are scored with the same
    mapping: the fused op's log-probs equal log_softmax of the model's own logits."""
    import transformers

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    if family == "gemma2":
        config = transformers.Gemma2Config(head_dim=16, final_logit_softcapping=3.0, attn_implementation="eager",
                                           **common)
    else:
        config = transformers.CohereConfig(logit_scale=0.25, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # logits large enough for the cap / scale to matter
    exs = Arithmetic().sample(random.Random(7), 3, [1])
    roll = from_pairs(tok, exs, [e.solution for e in exs], None, template="{prompt}\n", device="cpu")
    T = 0.8
    ours = score(model, roll, temperature=T, micro_batch=2)
    with torch.no_grad():
        logits = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask,
                       position_ids=roll.position_ids).logits[:, :-1].double()
    ref = torch.log_softmax(logits / T, -1).gather(-1, roll.targets.clamp_min(0)[..., None])[..., 0]
    m = roll.response_mask
    torch.testing.assert_close(ours[m].double(), ref[m], rtol=0, atol=2e-5)
    plain = torch.log_softmax(logits.new_tensor(0) + (model.lm_head(model.model(
        input_ids=roll.input_ids, attention_mask=roll.attention_mask,
        position_ids=roll.position_ids).last_hidden_state)[:, :-1].double() / T), -1)
    plain = plain.gather(-1, roll.targets.clamp_min(0)[..., None])[..., 0]
    assert (plain[m] - ref[m]).abs().max() > 1e-2  # the mapping matters at these logits
