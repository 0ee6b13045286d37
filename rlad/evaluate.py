"""Evaluation on held-out prompts: greedy accuracy, and mean@k / pass@k from k samples, per level."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from math import comb

import torch

from .rollout import generate
from .tasks import Example, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(model, tokenizer, task: Task, examples: Sequence[Example], *, template: str, max_new_tokens: int,
             samples: int = 0, temperature: float = 1.0, top_p: float = 1.0, batch_prompts: int = 64,
             progress=None) -> dict[str, float]:
    """``accuracy`` (greedy), and with ``samples = k > 0`` also ``mean@k`` and ``pass@k``; each
    also per level as ``accuracy/L3`` etc."""
    greedy: list[float] = []
    sampled: list[list[float]] = []
    for i in range(0, len(examples), batch_prompts):
        chunk = list(examples[i:i + batch_prompts])
        roll = generate(model, tokenizer, chunk, task, group_size=1, temperature=1.0, top_p=1.0,
                        max_new_tokens=max_new_tokens, template=template, greedy=True)
        greedy += roll.rewards.tolist()
        if samples > 0:
            roll = generate(model, tokenizer, chunk, task, group_size=samples, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, template=template)
            sampled += roll.rewards.view(len(chunk), samples).tolist()
        if progress is not None:
            progress.update(len(chunk))
    by_level = defaultdict(list)
    for j, ex in enumerate(examples):
        by_level[ex.level].append(j)
    out: dict[str, float] = {}

    def add(name, values_of):
        out[name] = float(torch.tensor([values_of(j) for j in range(len(examples))]).mean())
        for level, idx in sorted(by_level.items()):
            out[f"{name}/L{level}"] = float(torch.tensor([values_of(j) for j in idx]).mean())

    add("accuracy", lambda j: float(greedy[j] >= 1.0))
    if samples > 0:
        add(f"mean@{samples}", lambda j: sum(r >= 1.0 for r in sampled[j]) / samples)
        add(f"pass@{samples}", lambda j: pass_at_k(samples, sum(r >= 1.0 for r in sampled[j]), samples))
    return out
