"""How a task's prompt becomes the model's input, and where a sampled response ends.

The input is ``[bos] template(prompt)``: ``prompt_template`` (a ``str.format`` string with
``{prompt}``) applied to the task's prompt. With ``chat_template`` on (``auto``: when the tokenizer
has one, as instruct models' tokenizers do), the prompt template's text is the user message of the
tokenizer's own chat template, rendered once per run into a prompt template (``chat_template``
below), so every later step (tokenizing, the length checks, generation, SFT pairs) sees one string
with ``{prompt}`` in it. The bos token is prepended only when the template does not already begin
with it: a chat template usually opens with a marker that is the tokenizer's bos (SmolLM2's
``<|im_start|>``), and doubling it puts the model off its training distribution.

A response ends at the first of its stop tokens (``stop_token_ids``: the tokenizer's EOS and the
model's ``generation_config.eos_token_id``, an instruct model's end-of-turn token(s)), or at the
end of the first of the run's stop strings (kept in the response), else at ``max_new_tokens``
(truncated). See ``rlad.rollout.response_lengths``.
"""

from __future__ import annotations

CHAT_MODES = ("auto", "on", "off")
# stands for the user message while the chat template renders: plain text that no template rewrites
_SLOT = "rladUserMessage"  # mixed case: a template that changes its case is caught


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat(tokenizer, mode: str) -> bool:
    """Whether prompts go through the chat template: ``on``, ``off``, or ``auto`` (when the
    tokenizer has one). ``on`` without one is refused."""
    if mode not in CHAT_MODES:
        raise ValueError(f"chat_template={mode!r}: must be one of {', '.join(CHAT_MODES)}")
    if mode == "on" and not has_chat_template(tokenizer):
        raise ValueError(f"chat_template=on: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                         f"template; use chat_template=off (prompt_template alone builds the prompt) or a tokenizer "
                         f"that has one")
    return mode == "on" or (mode == "auto" and has_chat_template(tokenizer))


def chat_template(tokenizer, template: str, system_prompt: str | None = None) -> str:
    """``template`` (a prompt template; its text, stripped, is the user message) wrapped in the
    tokenizer's chat template, with the assistant's turn opened (``add_generation_prompt``): a
    prompt template again. Braces that the chat template writes are doubled, so only ``{prompt}``
    stays a field. ``system_prompt`` is the system message (None: the chat template's own
    default, if it has one)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": _SLOT})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a jinja template: any error it raises (a role it does not take, ...)
        raise ValueError(f"chat_template: the tokenizer's chat template fails on a system + user message: "
                         f"{type(e).__name__}: {e}; set system_prompt to none, or chat_template=off") from None
    if not isinstance(text, str) or text.count(_SLOT) != 1:
        raise ValueError("chat_template: the tokenizer's chat template does not write the user message once, as "
                         "given; use chat_template=off and write the markers in prompt_template")
    before, after = text.split(_SLOT)

    def literal(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    return literal(before) + template.strip() + literal(after)


def prompt_template(tokenizer, template: str, chat: str = "auto", system_prompt: str | None = None) -> str:
    """The run's prompt template: ``template``, through the tokenizer's chat template when
    ``chat`` says so (``uses_chat``)."""
    return chat_template(tokenizer, template, system_prompt) if uses_chat(tokenizer, chat) else template


def bos_prefix(tokenizer, template: str) -> list[int]:
    """``[bos]``, or nothing when the tokenizer has none or ``template`` already begins with it."""
    bos = tokenizer.bos_token
    if tokenizer.bos_token_id is None or (bos and template.startswith(bos)):
        return []
    return [tokenizer.bos_token_id]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS first, then the model's
    ``generation_config.eos_token_id`` (an int or a list: an instruct model's end-of-turn
    tokens)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids
