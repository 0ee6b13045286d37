"""Rollouts: G sampled responses per prompt, rewards, and per-token scoring with the fused op.

Sequences are ``[bos] prompt-template response [eos]`` with prompts left-padded (as
``generate`` wants them) and responses right-padded (``rlad.prompting``: the template, the bos,
and where a response ends). ``targets[b, j]`` is the token at
``j + 1`` when it belongs to the response (including its stop token), else -100, so every per-token
tensor has shape ``[B, L - 1]`` and lines up with ``hidden[:, :-1]``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from rlad_kernels import LMHead, linear_logprobs

from .batching import parts, same_count, token_columns
from .decode import Sampler, decode, positions
from .distributed import forward_in, generate_in, is_sharded
from .models import context_length, decoder_hidden
from .prompting import bos_prefix, stop_token_ids
from .runtime import progress
from .tasks import Example, Task
from .tokenizer import encode_texts

IGNORE = -100
# Rollout fields cut along their columns (``Rollout.cut``): [B, L] like input_ids, and [B, L-1] like targets
SEQ_FIELDS = ("input_ids", "attention_mask", "position_ids")
TOKEN_FIELDS = ("targets", "old_logp", "teacher_logp", "ref_logp", "token_advantages", "kd_weights")


@dataclass
class Rollout:
    """A batch of B = prompts x G sequences. Every tensor field is per row (dim 0 is B): ``select``
    cuts them all."""

    input_ids: torch.Tensor        # [B, L]
    attention_mask: torch.Tensor   # [B, L]
    position_ids: torch.Tensor     # [B, L]
    targets: torch.Tensor          # [B, L-1], IGNORE outside responses
    examples: list[Example]        # one per group (B / G)
    texts: list[str]               # decoded responses
    rewards: torch.Tensor          # [B]
    group_size: int
    old_logp: torch.Tensor | None = None          # [B, L-1] log-probs of the targets under the old student
    teacher_logp: torch.Tensor | None = None      # [B, L-1] ... under the teacher
    ref_logp: torch.Tensor | None = None          # [B, L-1] ... under the reference model
    advantages: torch.Tensor | None = None        # [B] one per response (group advantages)
    token_advantages: torch.Tensor | None = None  # [B, L-1] per token; when set, used instead of ``advantages``
    kd_weights: torch.Tensor | None = None        # [B, L-1] weight of the KD term per token (kdrl)
    truncated: torch.Tensor | None = None         # [B] bool: cut off at max_new_tokens before its EOS
    keep: torch.Tensor | None = None              # [B] bool: rows whose tokens count in the loss (None: all)

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, L-1]: the response tokens (including each one's EOS), kept in the loss or not."""
        return self.targets != IGNORE

    @property
    def loss_targets(self) -> torch.Tensor:
        """``targets`` with the rows that ``keep`` leaves out of the loss set to IGNORE: what the
        loss ops and the normalizer see."""
        if self.keep is None:
            return self.targets
        return torch.where(self.keep[:, None], self.targets, IGNORE)

    @property
    def loss_mask(self) -> torch.Tensor:
        """[B, L-1]: the tokens that count in the loss (``response_mask`` of the kept rows)."""
        return self.loss_targets != IGNORE

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def token_advantage(self) -> torch.Tensor:
        """[B, L-1]: ``token_advantages`` if set, else each response's advantage on all of its positions."""
        if self.token_advantages is not None:
            return self.token_advantages
        return self.advantages[:, None].expand(self.targets.shape)

    def select(self, idx: torch.Tensor) -> Rollout:
        """Rows ``idx`` (a micro-batch): every tensor field and the texts; per-group fields are kept whole."""
        rows = {f.name: getattr(self, f.name)[idx] for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, texts=[self.texts[i] for i in idx.tolist()], **rows)

    def cut(self, cols: slice) -> Rollout:
        """The rollout cut to the columns ``cols`` (a window of the ``[B, L]`` fields; the ``[B, L-1]``
        per-token fields are cut to ``batching.token_columns(cols)``). Every column cut off must be
        padding in every row (see ``rlad/batching.py``)."""
        cut = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or v.dim() < 2:
                continue
            if f.name in SEQ_FIELDS:
                cut[f.name] = v[:, cols]
            elif f.name in TOKEN_FIELDS:
                cut[f.name] = v[:, token_columns(cols)]
            else:  # a new per-token field must be named in SEQ_FIELDS or TOKEN_FIELDS, or it would not line up
                raise TypeError(f"Rollout.{f.name} has shape {tuple(v.shape)}: name it in rlad.rollout's SEQ_FIELDS "
                                f"or TOKEN_FIELDS")
        return replace(self, **cut)

    def micro_batches(self, idx: torch.Tensor, token_weights: torch.Tensor | None, *, size: int,
                      tokens: int | None) -> Iterator[tuple[Rollout, torch.Tensor | None]]:
        """The micro-batches of the rows ``idx`` (``batching.parts``: ``size`` rows each, or a token
        budget), each cut to its window (``cut``), and their token weights (``[B, L-1]`` or None)."""
        for micro, cols in parts(self.attention_mask, idx, size=size, tokens=tokens):
            tw = token_weights[micro][:, token_columns(cols)] if token_weights is not None else None
            yield self.select(micro).cut(cols), tw


def special_texts(tokenizer) -> list[str]:
    """The text of every special token (``<eos>``, ``<pad>``, chat markers, ...)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if decoder:
        return [t.content for t in decoder.values() if t.special]
    return list(tokenizer.all_special_tokens)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user text (a prompt, a response); see ``rlad.tokenizer.encode_texts``."""
    return encode_texts(tokenizer, [text])[0]


def encode_prompt(tokenizer, template: str, prompt: str) -> list[int]:
    """``template.format(prompt=prompt)`` tokenized: special-token text in the template (a chat
    marker) is the special token; in the prompt it stays text. A prompt without special-token
    text is tokenized in one piece with its template (the template's joints merge as usual)."""
    if not any(t in prompt for t in special_texts(tokenizer)):
        return tokenizer(template.format(prompt=prompt), add_special_tokens=False)["input_ids"]
    ids, fmt = [], string.Formatter()
    for literal, field, spec, conversion in fmt.parse(template):  # validated: {prompt} is the only field
        if literal:
            ids += tokenizer(literal, add_special_tokens=False)["input_ids"]
        if field is not None:
            ids += encode_text(tokenizer, fmt.format_field(fmt.convert_field(prompt, conversion), spec or ""))
    return ids


def _encode_all(tokenizer, prompts: Sequence[str], template: str) -> list[list[int]]:
    """``[bos] template(prompt)`` ids of each prompt (``encode_prompt``, batched)."""
    specials = special_texts(tokenizer)
    enc = tokenizer([template.format(prompt=p) for p in prompts], add_special_tokens=False)["input_ids"]
    for i, p in enumerate(prompts):
        if any(t in p for t in specials):
            enc[i] = encode_prompt(tokenizer, template, p)
    bos = bos_prefix(tokenizer, template)
    return [bos + ids for ids in enc]


def prompt_lengths(tokenizer, prompts: Sequence[str], template: str, chunk: int = 1024) -> list[int]:
    """Tokens of each encoded prompt (``[bos] template(prompt)``), without building the batch."""
    return [len(ids) for i in range(0, len(prompts), chunk)
            for ids in _encode_all(tokenizer, prompts[i:i + chunk], template)]


def encode_prompts(tokenizer, prompts: Sequence[str], template: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[bos] template(prompt)`` ids and attention mask, [B, P]."""
    rows = _encode_all(tokenizer, prompts, template)
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def check_context(examples: Sequence[Example], lengths: Sequence[int], max_new_tokens: int, limit: int | None,
                  what: str = "the model") -> None:
    """Refuse prompts whose tokens (``lengths``) plus ``max_new_tokens`` exceed the positions the
    model has (``limit``, from ``models.context_length``): past them a model fails with an
    IndexError or silently extrapolates."""
    if limit is None or not lengths:
        return
    i = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[i] + max_new_tokens > limit:
        line = examples[i].meta.get("line")
        where = f" (line {line})" if line is not None else ""
        raise ValueError(f"max_new_tokens={max_new_tokens}: a prompt of {lengths[i]} tokens{where} plus the response "
                         f"exceeds the {limit} positions of {what} (its config's max_position_embeddings or "
                         f"n_positions): {examples[i].prompt[:60]!r}; lower max_new_tokens or shorten the prompts")


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for: the longest token string of its
    vocabulary (a byte-level token's string has one character per byte, a SentencePiece or
    WordPiece token's is as long as its text or longer), at least 1."""
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def check_text_chars(examples: Sequence[Example], template: str, limit: int | None, chars_per_token: int,
                     what: str = "the model", where: str = "") -> None:
    """Before tokenizing: refuse an example whose prompt (in ``template``), answer or solution has
    more characters than ``limit`` positions could hold at ``chars_per_token`` (``max_token_chars``),
    naming ``where`` (a file) and its line. Tokenizing such a text costs time and memory that grow
    with it (a 5 MB line: half a minute and gigabytes) only to learn that it cannot fit."""
    if limit is None:
        return
    most = limit * chars_per_token
    extra = len(template) - len("{prompt}")
    for e in examples:
        for key, text, n in (("prompt", e.prompt, len(e.prompt) + extra), ("answer", e.answer, len(e.answer)),
                             ("solution", e.solution, len(e.solution or ""))):
            if text is not None and n > most:
                line = e.meta.get("line")
                at = f"{where}:{line}: " if where and line is not None else ""
                raise ValueError(f"{at}'{key}' has {len(text)} characters, more than the {limit} positions of {what} "
                                 f"could hold at {chars_per_token} characters per token (the longest token of the "
                                 f"tokenizer); shorten it or leave the example out")


def response_lengths(response_ids: torch.Tensor, stop_ids: int | Sequence[int], tokenizer=None,
                     stop_strings: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each response [B, T] ends: ([B] tokens kept, [B] bool ended). A response keeps its
    tokens up to and including its first stop token, or up to the token that completes the first
    occurrence of any of ``stop_strings`` in its decoded text (``tokenizer``), whichever comes
    first; one with neither keeps all T tokens and did not end (truncated at ``max_new_tokens``). A
    response that ends early is padded after its stop token, so it has one; one whose stop token is
    its last allowed token did end."""
    B, T = response_ids.shape
    ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    is_stop = torch.isin(response_ids, torch.tensor(ids, dtype=torch.long, device=response_ids.device))
    ended = is_stop.any(dim=1)
    lengths = torch.where(ended, is_stop.long().argmax(dim=1) + 1, torch.full_like(ended, T, dtype=torch.long))
    if stop_strings:
        for b in range(B):
            row = response_ids[b, :int(lengths[b])].tolist()

            def has_stop(k: int, row=row) -> bool:  # the first k tokens' text holds a stop string: monotone in k
                text = tokenizer.decode(row[:k], skip_special_tokens=True)
                return any(s in text for s in stop_strings)

            if not has_stop(len(row)):
                continue
            lo, hi = 1, len(row)  # the fewest tokens whose text holds one
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
            lengths[b], ended[b] = lo, True
    return lengths, ended


def assemble(prompt_ids, prompt_mask, response_ids, lengths: torch.Tensor, pad_id: int):
    """Join left-padded prompts [B, P] with responses [B, T], each cut after its first ``lengths[b]``
    tokens (``response_lengths``; padding after them)."""
    B, P = prompt_ids.shape
    T = response_ids.shape[1]
    kept = torch.arange(T, device=response_ids.device) < lengths.to(response_ids.device)[:, None]
    resp_mask = kept.long()
    response_ids = torch.where(kept, response_ids, torch.full_like(response_ids, pad_id))
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, resp_mask], dim=1)
    targets = torch.full((B, P + T - 1), IGNORE, dtype=torch.long, device=prompt_ids.device)
    targets[:, P - 1:] = torch.where(kept, response_ids, torch.full_like(response_ids, IGNORE))
    return input_ids, attention_mask, targets


class SeededSampler:
    """``decode.Sampler`` with per-row seeds as a ``transformers`` logits processor, for
    ``generate``'s greedy decoding (``_generate``): it returns every row's Gumbel-perturbed scores,
    whose argmax is a draw from ``softmax(logits / temperature)`` (cut to top-p). Row ``b`` draws
    its noise from a generator seeded with ``seeds[b]``, so a response does not depend on which
    other rows share its batch (or its rank)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device):
        self.sampler = Sampler(temperature, top_p, seeds, device)
        self.rows = range(len(seeds))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.sampler.perturbed(scores, self.rows)


def _generate(model, prompt_ids, prompt_mask, G: int, rows: list[int] | None, *, greedy: bool, temperature: float,
              top_p: float, max_new_tokens: int, stop_ids: list[int], tokenizer, stop: Sequence[str]) -> torch.Tensor:
    """``decode``'s fallback: ``model.generate`` of the prompts repeated G times, [B * G, T] new
    tokens; with ``rows`` (per-row seeds) through ``SeededSampler``. The model's own
    ``generation_config`` is overridden where it samples (temperature, top-p, no top-k)."""
    from transformers import LogitsProcessorList

    if greedy:
        kw = dict(do_sample=False)
    elif rows is not None:  # greedy decoding of the Gumbel-perturbed scores
        kw = dict(do_sample=False, logits_processor=LogitsProcessorList(
            [SeededSampler(rows, temperature, top_p, prompt_ids.device)]))
    else:
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    if stop:
        kw.update(stop_strings=list(stop), tokenizer=tokenizer)
    if is_sharded(model):  # in step with the other ranks
        kw["synced_gpus"] = True
    out = model.generate(input_ids=prompt_ids.repeat_interleave(G, dim=0),
                         attention_mask=prompt_mask.repeat_interleave(G, dim=0), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, **kw)
    return out[:, prompt_ids.shape[1]:]


@torch.no_grad()
def generate(model, tokenizer, examples: Sequence[Example], task: Task, *, group_size: int, temperature: float,
             top_p: float, max_new_tokens: int, template: str, greedy: bool = False,
             seeds: Sequence[int] | None = None, stop: Sequence[str] = ()) -> Rollout:
    """Sample ``group_size`` responses per example (greedy: one each) and score them with the task.
    A response ends at a stop token (``prompting.stop_token_ids``: the EOS and the model's
    end-of-turn tokens) or at the end of a ``stop`` string, else at ``max_new_tokens``.
    ``seeds`` (one per example): response ``j`` of example ``i`` is sampled from its own stream,
    seeded with ``seeds[i] + j`` (``decode.Sampler``), instead of torch's global one. The
    responses come from ``decode.decode`` (each prompt prefilled once for its group, a row dropped
    from the batch as it ends), or from ``generate`` for a model whose cache cannot drop rows. A
    sharded model generates inside its FSDP2 root, gathered whole for the call
    (``distributed.generate_in``): no rank waits for another's tokens."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], template, device)
    check_context(examples, prompt_mask.sum(-1).tolist(), max_new_tokens, context_length(model.config))
    G = 1 if greedy else group_size
    rows = None if seeds is None or greedy else [s + j for s in seeds for j in range(G)]
    stop_ids = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    response = generate_in(model, decode, prompt_ids, prompt_mask, G, max_new_tokens=max_new_tokens,
                           pick=Sampler(None if greedy else temperature, top_p, rows, device), stop_ids=stop_ids,
                           pad_id=tokenizer.pad_token_id, stop=stop, tokenizer=tokenizer)
    if response is None:  # a model whose cache cannot drop rows: transformers' generate of the repeated rows
        response = generate_in(model, _generate, prompt_ids, prompt_mask, G, rows, greedy=greedy,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               stop_ids=stop_ids, tokenizer=tokenizer, stop=stop)
    model.train(was_training)
    P = prompt_ids.shape[1]
    prompt_ids = prompt_ids.repeat_interleave(G, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(G, dim=0)
    if response.shape[1] == 0:  # max_new_tokens reached nothing (cannot happen with max_new_tokens >= 1)
        raise RuntimeError("generate returned no new tokens")
    lengths, ended = response_lengths(response, stop_ids, tokenizer, stop)
    input_ids, attention_mask, targets = assemble(prompt_ids, prompt_mask, response, lengths, tokenizer.pad_token_id)
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
             for r, m in zip(response, attention_mask[:, P:], strict=True)]
    rewards = torch.tensor([task.reward(examples[i // G], t) for i, t in enumerate(texts)], dtype=torch.float32,
                           device=device)
    return Rollout(input_ids, attention_mask, positions(attention_mask), targets, list(examples), texts, rewards, G,
                   truncated=~ended)


@torch.no_grad()
def score(model, roll: Rollout, *, temperature: float, micro_batch: int, head_rows: int | None = None,
          impl: str | None = None, micro_batch_tokens: int | None = None) -> torch.Tensor:
    """Per-token log-probs [B, L-1] (float32) of the rollout's response tokens under ``model``.

    ``head_rows`` cuts a padded lm_head to the student's vocabulary (a teacher scoring student
    tokens normalizes over the same V columns as the student). With ``micro_batch_tokens`` the
    rows go in length-sorted groups of at most that many padded tokens, each cut to its own
    window of columns (``rlad.batching``); the values are the same up to float rounding. Under
    torchrun every rank runs the same number of forwards (``batching.same_count``), as FSDP2's
    gathers need."""
    def part(m, rows, cols):  # inside the FSDP2 root's forward when sharded: the lm_head weight is gathered there
        head = LMHead.of(m)
        if head_rows is not None:
            head = LMHead(head.weight[:head_rows], head.bias[:head_rows] if head.bias is not None else None,
                          head.logit_scale, head.softcap)
        h = decoder_hidden(m, roll.input_ids[rows, cols], roll.attention_mask[rows, cols],
                           roll.position_ids[rows, cols])
        return linear_logprobs(h[:, :-1], head, roll.targets[rows, token_columns(cols)], temperature=temperature,
                               impl=impl).float()

    out = torch.zeros(roll.targets.shape, dtype=torch.float32, device=roll.targets.device)
    rows = torch.arange(len(roll), device=roll.input_ids.device)
    was_training = model.training
    model.eval()
    for micro, cols, real in same_count(parts(roll.attention_mask, rows, size=micro_batch, tokens=micro_batch_tokens)):
        lp = forward_in(model, part, micro, cols)
        if real:  # a padding forward (another rank has more parts) only takes part in the gathers
            out[micro, token_columns(cols)] = lp
    model.train(was_training)
    return out


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = True) -> torch.Tensor:
    """GRPO: (R - mean_G R) / (std_G R + 1e-6) per group (std_norm=False: Dr. GRPO, no division)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-6)
    return adv.reshape(-1)


def from_pairs(tokenizer, examples: Sequence[Example], responses: Sequence[str], task: Task | None, *,
               template: str, device) -> Rollout:
    """A batch of given (prompt, response) pairs, e.g. solutions to train on with SFT."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], template, device)
    rows = [encode_text(tokenizer, r) + [tokenizer.eos_token_id] for r in responses]
    T = max(len(r) for r in rows)
    resp = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    input_ids, attention_mask, targets = assemble(prompt_ids, prompt_mask, resp.to(device), lengths,
                                                  tokenizer.pad_token_id)
    scores = [task.reward(e, r) if task is not None else 1.0 for e, r in zip(examples, responses, strict=True)]
    rewards = torch.tensor(scores, dtype=torch.float32, device=device)
    return Rollout(input_ids, attention_mask, positions(attention_mask), targets, list(examples), list(responses),
                   rewards, 1, truncated=torch.zeros(len(rows), dtype=torch.bool, device=device))


def build_sft_pool(cfg, teacher, tok, task: Task, levels, seed: int, *, template: str) -> list[tuple[Example, str]]:
    """Offline distillation data: the teacher samples solutions; only correct ones are kept (with
    ``drop_truncated``, only those that also ended within ``max_new_tokens``)."""
    rng = random.Random(seed)
    examples = task.sample(rng, cfg.sft_prompts, levels)
    pool, cut = [], 0
    bar = progress(cfg.quiet, total=len(examples), desc="teacher solutions", leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(examples), cfg.prompts_per_step):
            chunk = examples[i:i + cfg.prompts_per_step]
            roll = generate(teacher, tok, chunk, task, group_size=cfg.group_size, temperature=cfg.temperature,
                            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, template=template,
                            stop=cfg.stop)
            for j, text in enumerate(roll.texts):
                if roll.rewards[j] < 1.0:
                    continue
                if cfg.drop_truncated and roll.truncated[j]:
                    cut += 1
                else:
                    pool.append((chunk[j // roll.group_size], text))
            bar.update(len(chunk))
    bar.close()
    if not pool:
        why = (f" (drop_truncated left out its {cut} correct solution(s) cut off at max_new_tokens="
               f"{cfg.max_new_tokens})" if cut else "")
        raise ValueError(f"sft: the teacher solved none of the prompts{why}, so there is nothing to distill; "
                         f"check the teacher, the task and max_new_tokens")
    if cut:
        print(f"sft: drop_truncated left {cut} correct but truncated teacher solution(s) out of the pool "
              f"({len(pool)} kept)", flush=True)
    return pool
