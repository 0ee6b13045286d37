"""Micro-batches for long chains of thought: a token budget instead of a row count, and no
computation on padding beyond each micro-batch's own longest sequence.

A rollout stores ``[bos] prompt response [eos]`` rows in one ``[B, L]`` tensor, prompts
left-padded to a common start of the response (column ``P``) and responses right-padded
(``rlad/rollout.py``). Row ``b`` therefore attends to one contiguous window of columns
``[start_b, end_b)``. With ``micro_batch_tokens = N``:

- the rows of a mini-batch are sorted by their length ``end_b - start_b`` (longest first, ties
  in mini-batch order) and packed greedily, in that order, into micro-batches whose padded
  size ``rows x (max end - min start)`` is at most ``N``; a single row longer than ``N`` is a
  micro-batch of its own;
- each micro-batch is cut to its window of columns ``[min start, max end)``: the
  ``[B, L]`` fields (``input_ids``, ``attention_mask``, ``position_ids``) to
  ``[s, e)``, the ``[B, L-1]`` per-token fields (targets, log-probs, advantages, weights) to
  ``[s, e-1)``. The columns cut off are padding in every row of the micro-batch (attention
  mask 0), so the kept tokens see the same keys and keep their position ids, and no target
  lies outside the window: the loss and its gradient are those of the untrimmed rows up to
  float rounding. The window's width is ``max prompt + max response`` of the micro-batch (the
  prompts stay left-padded, the responses right-padded), which is what ``N`` bounds.

This module plans the cuts from the attention mask alone; ``Rollout.cut`` applies them to every
field and ``Rollout.micro_batches`` yields the cut micro-batches. Since the normalizer of an
optimizer step is global (``train.normalizer_for``), how the rows are grouped changes float
rounding only. What is not done: packing several sequences into one row
(``position_ids`` restarting inside a row, varlen flash attention); on CPU the cut to each
micro-batch's window is where the saving is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .distributed import all_max


def windows(attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per row, the first attended column and one past the last (a row attending to nothing
    gets the whole width). One device-to-host transfer."""
    mask = attention_mask != 0
    L = mask.shape[1]
    first = mask.int().argmax(dim=1)
    last = L - mask.flip(1).int().argmax(dim=1)
    none = ~mask.any(dim=1)
    first, last = torch.where(none, 0, first), torch.where(none, L, last)
    start, end = torch.stack([first, last]).tolist()
    return start, end


def pack(start: Sequence[int], end: Sequence[int], budget: int) -> list[list[int]]:
    """Groups of positions (into ``start``/``end``) whose padded size, ``len(group) x (max end -
    min start)``, is at most ``budget``: rows sorted by length, longest first (ties by position),
    cut greedily into consecutive runs; a row longer than ``budget`` is a group of its own."""
    if budget < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {budget}")
    order = sorted(range(len(start)), key=lambda i: (-(end[i] - start[i]), i))
    groups: list[list[int]] = []
    group: list[int] = []
    lo = hi = 0
    for i in order:
        new_lo, new_hi = (min(lo, start[i]), max(hi, end[i])) if group else (start[i], end[i])
        if group and (len(group) + 1) * (new_hi - new_lo) > budget:
            groups.append(group)
            group, (new_lo, new_hi) = [], (start[i], end[i])
        group.append(i)
        lo, hi = new_lo, new_hi
    if group:
        groups.append(group)
    return groups


def plan(attention_mask: torch.Tensor, rows: torch.Tensor, budget: int) -> list[tuple[torch.Tensor, slice]]:
    """The token-budget micro-batches of ``rows`` (indices into ``attention_mask``'s rows): each
    one's row indices and its window of columns ``slice(s, e)`` of the ``[B, L]`` fields."""
    start, end = windows(attention_mask[rows])
    out = []
    for group in pack(start, end, budget):
        pos = torch.tensor(group, dtype=torch.long, device=rows.device)
        out.append((rows[pos], slice(min(start[i] for i in group), max(end[i] for i in group))))
    return out


def token_columns(cols: slice) -> slice:
    """The ``[B, L-1]`` per-token columns that line up with the ``[B, L]`` window ``cols``."""
    return slice(cols.start, cols.stop - 1)


def parts(attention_mask: torch.Tensor, idx: torch.Tensor, *, size: int,
          tokens: int | None) -> list[tuple[torch.Tensor, slice]]:
    """The micro-batches of the rows ``idx``, as (row indices, window of columns): ``size`` rows
    each in order, over all columns (``tokens`` 0 or None), or, with a token budget, ``plan``'s
    length-sorted groups and their windows."""
    if tokens:
        return plan(attention_mask, idx, tokens)
    return [(micro, slice(0, attention_mask.shape[1])) for micro in idx.split(size)]


def same_count(parts: list) -> Iterator[tuple]:
    """``(*part, real)`` for each of ``parts``, then, under torchrun, ``(*parts[-1], False)`` until
    every rank has yielded as many as the rank with the most: FSDP2 gathers each sharded layer in
    every forward, so all ranks must run the same number of them. A padding part (``real`` False)
    repeats a real one; its result must be dropped (scoring) or weighted by 0 (the loss)."""
    n = all_max(len(parts))
    for i in range(n):
        yield (*parts[min(i, len(parts) - 1)], i < len(parts))
