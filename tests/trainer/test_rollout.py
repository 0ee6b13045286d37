"""Rollouts: the trainer's per-token log-probs are the sampler's, targets line up with tokens,
evaluation metrics, and the ``rlad eval`` command."""

import random
from math import comb

import pytest
import torch

from rlad.cli import main
from rlad.decode import Sampler, decode
from rlad.evaluate import pass_at_k
from rlad.models import load_model
from rlad.rollout import (
    IGNORE,
    Rollout,
    SeededSampler,
    assemble,
    encode_prompts,
    from_pairs,
    positions,
    response_lengths,
    score,
)
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


def _peaked(tok):
    model = load_model("preset:tiny-student", tok, seed=3).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    return model


@pytest.mark.parametrize("greedy", [False, True])
def test_decode_samples_what_generate_samples(tok, greedy):
    """``decode`` (each prompt prefilled once, a row dropped from the batch and the cache as it
    ends) gives each row the tokens transformers' ``generate`` gives the repeated rows with the same
    per-row streams (prompts of different lengths, left-padded; rows that end early and rows that
    run to the limit), and the prompts go through the model once: B x (P - 1) tokens, then one
    token per live row per step, fewer rows as they end."""
    from transformers import LogitsProcessorList

    model = _peaked(tok)
    exs = Arithmetic().sample(random.Random(7), 3, [1, 4])
    ids, mask = encode_prompts(tok, [e.prompt for e in exs], "{prompt}\n", "cpu")
    assert mask.sum(-1).unique().numel() > 1  # left padding is exercised
    B, P = ids.shape
    G, T = (1, 12) if greedy else (4, 12)
    seeds = list(range(100, 100 + B * G))
    first = decode(model, ids, mask, G, max_new_tokens=T, pick=Sampler(None if greedy else 0.9, 1.0, seeds),
                   stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    stops = [tok.eos_token_id, int(first[0, 2])]  # row 0's third token also ends a response: rows end apart
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    ours = decode(model, ids, mask, G, max_new_tokens=T, pick=Sampler(None if greedy else 0.9, 1.0, seeds),
                  stop_ids=stops, pad_id=tok.pad_token_id)
    hook.remove()
    kw = dict(do_sample=False) if greedy else dict(do_sample=False, logits_processor=LogitsProcessorList(
        [SeededSampler(seeds, 0.9, 1.0, "cpu")]))
    with torch.no_grad():
        ref = model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                             max_new_tokens=T, pad_token_id=tok.pad_token_id, eos_token_id=stops, **kw)[:, P:]
    assert torch.equal(ours, ref[:, :ours.shape[1]]) and (ref[:, ours.shape[1]:] == tok.pad_token_id).all()
    lengths, ended = response_lengths(ours, stops)
    assert seen[0] == (B, P - 1)  # the prefill: each prompt once, without its last token
    live = [n for n, _ in seen[1:]]
    assert sum(live) == int(lengths.sum())  # one forward per token a row produced: none for finished rows
    if not greedy:  # (the tiny model's greedy rows all repeat one token)
        assert ended.any() and lengths.min() < lengths.max()  # rows end at different steps
        assert live[0] == B * G and all(a >= b for a, b in zip(live, live[1:], strict=False)) and live[-1] < B * G


def test_decode_logits_equal_generates_up_to_rounding(tok):
    """The logits each row's token is drawn from are ``generate``'s: the same float32 math with the
    matmuls blocked differently (a prefill of B rows, a batch that shrinks), so equal up to rounding
    over the widest reduction (the MLP's 192 inputs); a position off by a row's padding is 5e-3."""
    model = _peaked(tok)
    exs = Arithmetic().sample(random.Random(7), 3, [1, 4])
    ids, mask = encode_prompts(tok, [e.prompt for e in exs], "{prompt}\n", "cpu")
    G, T = 2, 6
    logits = {}

    def record(scores, rows):
        for r, row in zip(rows.tolist(), scores, strict=True):
            logits.setdefault(r, []).append(row.clone())
        return scores.argmax(-1)

    ours = decode(model, ids, mask, G, max_new_tokens=T, pick=record, stop_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                             max_new_tokens=T, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours, ref.sequences[:, ids.shape[1]:][:, :ours.shape[1]])
    ref_logits = torch.stack(ref.logits, 1).float()  # [rows, steps, V]
    tol = 192 * torch.finfo(torch.float32).eps * ref_logits.abs().max().item()
    for r, rows in logits.items():
        torch.testing.assert_close(torch.stack(rows), ref_logits[r, :len(rows)], rtol=0, atol=tol)


def test_decode_stops_at_a_stop_string_and_falls_back_for_a_legacy_cache(tok, monkeypatch):
    """A row ends once its text holds a stop string (the token completing it kept); a model whose
    cache cannot drop rows is sampled by ``generate`` instead, with the same responses."""
    from rlad.rollout import generate

    model = _peaked(tok)
    exs = Arithmetic().sample(random.Random(3), 4, [1, 2])
    kw = dict(group_size=2, temperature=0.8, top_p=1.0, max_new_tokens=10, template="{prompt}\n",
              seeds=[5, 9, 13, 17], stop=["li", "so"])
    roll = generate(model, tok, exs, Arithmetic(), **kw)
    texts = roll.texts
    ended = [t for t in texts if "li" in t or "so" in t]
    assert 0 < len(ended) < len(texts)
    for row, text in zip(roll.targets, texts, strict=True):
        ids = row[row != IGNORE].tolist()
        before_last = tok.decode(ids[:-1], skip_special_tokens=True)
        assert "li" not in before_last and "so" not in before_last  # the row ended at the token completing it
        assert text == tok.decode(ids, skip_special_tokens=True)
    from transformers import DynamicCache

    owner = next(k for k in DynamicCache.__mro__ if "batch_select_indices" in k.__dict__)
    monkeypatch.delattr(owner, "batch_select_indices")  # a cache that cannot drop rows
    ids, mask = encode_prompts(tok, [e.prompt for e in exs], "{prompt}\n", "cpu")
    assert decode(model, ids, mask, 2, max_new_tokens=4, pick=Sampler(None), stop_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id) is None
    again = generate(model, tok, exs, Arithmetic(), **kw)
    assert again.texts == texts and torch.equal(again.input_ids, roll.input_ids)


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
