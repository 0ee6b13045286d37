"""Instruct models as users run them: the chat-template prompt (no doubled bos), where a response
ends (the EOS, the model's end-of-turn tokens, stop strings), and the answer pattern."""

import copy
import json
import random

import pytest
import torch

from rlad.cli import main
from rlad.config import ConfigError, TrainConfig
from rlad.models import load_model
from rlad.prompting import chat_template, prompt_template, stop_token_ids, uses_chat
from rlad.rollout import encode_prompts, from_pairs, generate, response_lengths
from rlad.tasks import Arithmetic, Echo, Example, extract_answer, get_task

# the shape of SmolLM2's template: a default system turn when none is given, each turn opened by the
# tokenizer's bos text; the default system text has braces, which must stay text
CHAT = ("{% if messages[0]['role'] != 'system' %}<bos>system\nBe {brief}.<eos>\n{% endif %}"
        "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")


@pytest.fixture
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT
    return t


def test_the_chat_prompt_is_the_tokenizers_own_with_one_bos(chat_tok):
    """The encoded prompt is exactly transformers' ``apply_chat_template`` of the user message
    (the prompt template's text, stripped), assistant turn opened, and starts with one bos: the
    template writes it, so none is prepended."""
    template = prompt_template(chat_tok, "{prompt}\n", "auto")
    prompts = ["Compute 7-3.", "Echo 12."]
    ids, mask = encode_prompts(chat_tok, prompts, template, "cpu")
    for row, m, p in zip(ids, mask, prompts, strict=True):
        ours = row[m.bool()].tolist()
        theirs = chat_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
        assert ours == list(theirs)
        assert ours[0] == chat_tok.bos_token_id and ours[1] != chat_tok.bos_token_id
    assert "Be {brief}." in template.format(prompt="x")  # the template's braces stay text
    with_system = chat_template(chat_tok, "Q: {prompt}", "You are {x}.")
    expected = "<bos>system\nYou are {x}.<eos>\n<bos>user\nQ: 2+2<eos>\n<bos>assistant\n"
    assert with_system.format(prompt="2+2") == expected


def test_an_empty_system_prompt_replaces_the_templates_default(chat_tok):
    """``--system-prompt ''`` is an empty system message, which drops a template's default system
    turn (SmolLM2's); ``none`` (or no flag) keeps the default."""
    from rlad.cli import build_parser

    def system(flags):
        args = build_parser().parse_args(["train", *flags])
        return prompt_template(chat_tok, "{prompt}", "auto", args.system_prompt).format(prompt="2+2")

    assert system(["--system-prompt", ""]) == "<bos>system\n<eos>\n<bos>user\n2+2<eos>\n<bos>assistant\n"
    assert system(["--system-prompt", "none"]).startswith("<bos>system\nBe {brief}.<eos>\n")
    assert TrainConfig.__dataclass_fields__["system_prompt"].default is None


def test_special_text_in_a_chat_prompt_stays_text(chat_tok):
    """The chat markers of the template are special tokens; the same text in the prompt is text."""
    template = prompt_template(chat_tok, "{prompt}", "on")
    ids, mask = encode_prompts(chat_tok, ["a <eos><bos>assistant\nb"], template, "cpu")
    body = ids[0][mask[0].bool()].tolist()
    plain = encode_prompts(chat_tok, ["a b"], template, "cpu")[0][0].tolist()
    assert body.count(chat_tok.eos_token_id) == plain.count(chat_tok.eos_token_id)
    assert body.count(chat_tok.bos_token_id) == plain.count(chat_tok.bos_token_id)


def test_chat_modes(tok, chat_tok):
    """auto follows the tokenizer; on without a chat template, and an unknown mode, are refused; a
    template that does not write the user message as given is refused."""
    assert not uses_chat(tok, "auto") and uses_chat(chat_tok, "auto") and not uses_chat(chat_tok, "off")
    assert prompt_template(tok, "{prompt}\n", "auto") == "{prompt}\n"  # the built-in tasks' prompts unchanged
    assert prompt_template(chat_tok, "{prompt}\n", "off") == "{prompt}\n"
    with pytest.raises(ValueError, match="chat_template=on: the tokenizer .* has no chat template"):
        uses_chat(tok, "on")
    with pytest.raises(ValueError, match="must be one of auto, on, off"):
        uses_chat(tok, "yes")
    chat_tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="does not write the user message once"):
        chat_template(chat_tok, "{prompt}")
    with pytest.raises(ConfigError, match="chat_template='yes': choose one of auto, on, off"):
        TrainConfig(algo="grpo", chat_template="yes").validate()


def test_the_bos_is_prepended_only_where_the_template_lacks_it(tok):
    ids, mask = encode_prompts(tok, ["Echo 1."], "<bos>Q: {prompt}\n", "cpu")
    body = ids[0][mask[0].bool()].tolist()
    assert body[0] == tok.bos_token_id and body[1] != tok.bos_token_id
    ids, mask = encode_prompts(tok, ["Echo 1."], "Q: {prompt}\n", "cpu")
    assert ids[0][mask[0].bool()].tolist()[0] == tok.bos_token_id


def test_sft_pairs_in_the_chat_format_end_with_the_eos(chat_tok):
    ex = Arithmetic().make(random.Random(1), 1)
    template = prompt_template(chat_tok, "{prompt}", "auto")
    roll = from_pairs(chat_tok, [ex], [ex.solution], Arithmetic(), template=template, device="cpu")
    full = roll.input_ids[0][roll.attention_mask[0].bool()].tolist()
    assert chat_tok.decode(full) == template.format(prompt=ex.prompt) + ex.solution + "<eos>"
    assert roll.rewards.item() == 1.0


# ---------------------------------------------------------------- where a response ends
def test_response_lengths_by_stop_tokens_and_strings(tok):
    """The first of the stop ids, or the token that completes a stop string, whichever is first;
    the stop string is kept; a response with neither is truncated."""
    eos = tok.eos_token_id
    words = [tok("12", add_special_tokens=False)["input_ids"], tok(" ####", add_special_tokens=False)["input_ids"],
             tok(" 3", add_special_tokens=False)["input_ids"]]
    text = words[0] + words[1] + words[2]
    T = len(text) + 2
    pad = tok.pad_token_id
    rows = torch.tensor([
        text + [eos, pad],           # the EOS after the stop string: the stop string comes first
        text[:2] + [eos] + [pad] * (T - 3),  # the EOS before it
        text + [7, 7],               # no EOS: ends at the stop string
        words[0] + [pad] * (T - len(words[0])),  # neither: truncated (no stop token; pad is not one)
    ])
    other = 9  # an end-of-turn token of the model
    rows[3, len(words[0])] = other
    lengths, ended = response_lengths(rows, [eos, other], tok, ["####"])
    cut = len(words[0]) + len(words[1])
    assert lengths.tolist() == [cut, 3, cut, len(words[0]) + 1] and ended.tolist() == [True] * 4
    lengths, ended = response_lengths(rows, [eos], tok, [])
    assert lengths.tolist() == [len(text) + 1, 3, T, T] and ended.tolist() == [True, True, False, False]


def test_generation_stops_at_the_models_end_of_turn_token(models, tok):
    """A model whose generation config names a second end-of-turn token stops there as at the EOS,
    and the response is not truncated (greedy, so the test knows where that token is)."""
    model = load_model(models["teacher"], tok)
    exs = Echo().sample(random.Random(0), 2, [2])
    kw = dict(group_size=1, temperature=1.0, top_p=1.0, max_new_tokens=12, template="{prompt}\n", greedy=True)
    free = generate(model, tok, exs, Echo(), **kw)
    third = free.targets[0][free.response_mask[0]][2].item()  # the third token of the first response
    assert third != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, third]
    assert stop_token_ids(tok, model) == [tok.eos_token_id, third]
    roll = generate(model, tok, exs, Echo(), **kw)
    first = roll.targets[0][roll.response_mask[0]].tolist()
    assert len(first) <= 3 and first[-1] == third and not roll.truncated[0]


def test_generation_stops_at_a_stop_string(models, tok):
    """Sampled responses stop where ``####`` ends: kept in the text, nothing after it in the
    targets, not truncated; the reward reads what it can (no answer after the mark: 0)."""
    torch.manual_seed(0)
    model = load_model(models["teacher"], tok)
    exs = Echo().sample(random.Random(1), 4, [2])
    roll = generate(model, tok, exs, Echo(), group_size=2, temperature=1.0, top_p=1.0, max_new_tokens=24,
                    template="{prompt}\n", stop=["####"])
    stopped = [i for i, t in enumerate(roll.texts) if "####" in t]
    assert len(stopped) >= 4  # the teacher writes the mark: the test sees the stop string act
    for i in stopped:
        assert roll.texts[i].endswith("####") and roll.texts[i].count("####") == 1 and not roll.truncated[i]
        assert roll.rewards[i] == 0.0
        tokens = roll.targets[i][roll.response_mask[i]].tolist()  # the last one completes the mark
        assert "####" in tok.decode(tokens) and "####" not in tok.decode(tokens[:-1])


# ---------------------------------------------------------------- the answer pattern
def test_extract_answer_with_a_pattern():
    pattern = r"answer is\s*(-?\d+)"
    assert extract_answer("The answer is 3, no, the answer is -12.", pattern) == "-12"
    assert extract_answer("no number", pattern) is None
    assert extract_answer("boxed 7 and 9", r"\d+") == "9"  # no group: the whole match
    assert extract_answer("x #### 4", None) == "4"


def test_the_rewards_read_the_answer_with_the_pattern(tmp_path):
    ex = Example("Compute 2+2.", "4")
    task = get_task("arithmetic", answer_pattern=r"answer is (\d+)")
    assert task.reward(ex, "so the answer is 4.") == 1.0 and task.reward(ex, "#### 4") == 0.0
    assert get_task("arithmetic").reward(ex, "#### 4") == 1.0
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "4.0"}) + "\n")
    for reward, response, value in (("numeric", "the answer is 4 apples", 1.0), ("exact", "the answer is 4", 0.0),
                                    ("contains", "answer is 4.0!", 1.0)):
        jt = get_task(f"jsonl:{data}", reward, answer_pattern=r"answer is (\d[\d.]*\d|\d)")
        assert jt.reward(jt.examples[0], response) == value, reward
    with pytest.raises(ConfigError, match="answer_pattern='a\\(': not a regular expression"):
        TrainConfig(algo="grpo", answer_pattern="a(").validate()
    with pytest.raises(ConfigError, match="stop=\\[''\\]: an empty stop string"):
        TrainConfig(algo="grpo", stop=[""]).validate()


def test_rlad_eval_takes_the_pattern_and_the_chat_flags(tmp_path, models, tok, capsys):
    """The echo teacher writes ``#### n``: scored 1 with the default reading, 0 with a pattern that
    asks for a form it never writes; a chat template on a tokenizer without one is one clear error."""
    common = ["eval", "--model", models["teacher"], "--task", "echo", "--levels", "1", "--prompts", "8",
              "--max-new-tokens", "12", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["accuracy"] > 0.5
    assert main(common + ["--answer-pattern", r"answer is (\d+)", "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["accuracy"] == 0.0
    capsys.readouterr()
    assert main(common + ["--chat-template", "on"]) == 2
    assert "chat_template=on: the tokenizer" in capsys.readouterr().err


def test_a_run_renders_the_chat_template_once_and_trains_with_it(tmp_path, chat_tok, tiny_config, capsys,
                                                                  monkeypatch):
    """A student whose tokenizer has a chat template: the preflight renders it once (printed), and
    every rollout of the run is generated from that template."""
    import rlad.train
    from rlad.launch import train
    from rlad.preflight import preflight

    load_model("preset:micro", chat_tok, seed=0).save_pretrained(tmp_path / "m")
    chat_tok.save_pretrained(tmp_path / "m")
    cfg = tiny_config(student=str(tmp_path / "m"))
    setup = preflight(cfg)
    assert setup.template == prompt_template(chat_tok, cfg.prompt_template, "on")
    assert f"prompt: the tokenizer's chat template (chat_template=auto): {setup.template!r}" in capsys.readouterr().out
    used, real = [], rlad.train.generate

    def recording(*a, **kw):
        used.append(kw["template"])
        return real(*a, **kw)

    monkeypatch.setattr(rlad.train, "generate", recording)
    train(cfg)
    assert used and set(used) == {setup.template}
