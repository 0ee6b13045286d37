"""Sampling responses with a KV cache: each prompt prefilled once, finished rows dropped.

``transformers``' ``generate`` does two things a rollout does not need. It runs each prompt
through the model once per response (a group of G responses prefills the same prompt G times),
and it keeps computing every row until the last one ends, so a batch whose responses mostly end
after 15 tokens while one runs to 57 computes 57 tokens for every row. On a CPU, where a decode
step's time grows with its rows, that is most of the generation time of an RL step
(docs/real-model.md has the measurements).

``decode`` prefills each prompt once (its tokens but the last, through the decoder alone: no
logits), repeats the cache for the group (``Cache.batch_repeat_interleave``), then decodes one
token per live row per step, dropping a row from the batch and from the cache
(``Cache.batch_select_indices``) as soon as it ends: at a stop token, or once its text holds a
stop string. What a row samples depends only on its own prompt and its own random stream
(``pick``), so dropping other rows does not change it: with per-row seeds (``Sampler``)
the tokens are those ``generate`` samples, up to float rounding of the logits (the tests compare
them). Sampling is exactly ``softmax(logits / T)`` (with top-p): a model's own
``generation_config`` (a repetition penalty, say) is not applied, so the rollout's tokens come
from the distribution the trainer scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [n, V] of the live rows, their indices) -> [n]


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes a KV cache and its output holds one: ``cache``
    from transformers 5.2x, ``past_key_values`` before (still accepted by the newer versions, with
    a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _cuttable(cache) -> bool:
    """A cache ``decode`` can repeat for a group and cut to the live rows (transformers' ``Cache``)."""
    return all(hasattr(cache, m) for m in ("batch_repeat_interleave", "batch_select_indices"))


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, G: int, *, max_new_tokens: int, pick: Pick,
           stop_ids: Sequence[int], pad_id: int, stop: Sequence[str] = (), tokenizer=None) -> torch.Tensor | None:
    """``G`` responses to each left-padded prompt row ([B, P]): [B * G, T] new tokens, the rows of a
    prompt adjacent, each padded with ``pad_id`` after the token that ended it; T is the most
    tokens any row produced (at most ``max_new_tokens``). ``pick`` chooses each live row's next
    token from its logits (float32, [n, V]) and its row index in [0, B * G). None when the model's
    cache cannot be cut to the live rows (a legacy tuple, a recurrent state): ``rollout.generate``
    then samples with ``generate``."""
    name = cache_kwarg(model)
    device = prompt_ids.device
    B, P = prompt_ids.shape
    N = B * G
    mask = prompt_mask.repeat_interleave(G, dim=0)
    start = positions(prompt_mask)[:, -1].repeat_interleave(G, dim=0)  # the last prompt token's position
    cache = None
    if P > 1:  # the prompts but their last token, once each, through the decoder only
        out = model.get_decoder()(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                                  position_ids=positions(prompt_mask)[:, :-1], use_cache=True)
        cache = getattr(out, name, None)
        if not _cuttable(cache):
            return None
        if G > 1:
            cache.batch_repeat_interleave(G)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    response = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)
    current = prompt_ids[:, -1:].repeat_interleave(G, dim=0)
    t = 0
    for t in range(max_new_tokens):
        attention = torch.cat([mask[live], torch.ones(len(live), t, dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=current, attention_mask=attention, position_ids=(start[live] + t)[:, None],
                    use_cache=True, **{name: cache})
        cache = getattr(out, name)
        if t == 0 and not _cuttable(cache):
            return None
        chosen = pick(out.logits[:, -1].float(), live)
        response[live, t] = chosen
        ended = torch.isin(chosen, stops)
        if stop:
            for i, row in enumerate(live.tolist()):
                if not ended[i]:
                    text = tokenizer.decode(response[row, :t + 1].tolist(), skip_special_tokens=True)
                    ended[i] = any(s in text for s in stop)
        if bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            live, chosen = live[keep], chosen[keep]
        current = chosen[:, None]
    return response[:, :t + 1]


class Sampler:
    """``pick`` for ``decode``: greedy (``temperature`` None), or a draw from ``softmax(logits /
    temperature)`` cut to its top-p nucleus. With ``seeds`` (one per row), row ``r`` draws from its
    own generator by the Gumbel-max trick (``argmax(scores + Gumbel noise)``), so what it samples
    does not depend on which other rows are live; without, every live row draws from torch's
    global generator (``torch.multinomial``)."""

    def __init__(self, temperature: float | None, top_p: float = 1.0, seeds: Sequence[int] | None = None,
                 device="cpu"):
        from transformers import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if temperature is not None and top_p < 1.0 else None
        self.gens = None if seeds is None else [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float() / self.temperature
        return scores if self.top_p is None else self.top_p(None, scores)

    def perturbed(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """The scores plus each row's next Gumbel noise from its own generator: their argmax is a
        draw from ``softmax(scores)``. Needs ``seeds``."""
        scores = self.scores(logits)
        u = torch.stack([torch.rand(scores.shape[1], generator=self.gens[r], device=scores.device) for r in rows])
        return scores - torch.log(-torch.log(u))

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.temperature is None:
            return logits.argmax(-1)
        if self.gens is None:
            return torch.multinomial(torch.softmax(self.scores(logits), -1), 1)[:, 0]
        return self.perturbed(logits, rows.tolist()).argmax(-1)
