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
             stop: Sequence[str] = (), progress=None, responses: list | None = None,
             temperatures: Sequence[float] = ()) -> dict[str, float]:
    """``accuracy`` (greedy), and with ``samples = k > 0`` also ``mean@k`` and ``pass@k``; each
    also per level as ``accuracy/L3`` etc., each with its standard error over prompts
    (``accuracy_se``, ``accuracy_se/L3``), and the number of prompts ``n``, ``n/L3``. With
    ``temperatures``, k samples per prompt at each of them instead of at ``temperature``, named
    ``mean@k_T0.6`` etc. (``sampled_name``). With a ``responses`` list, every response is appended
    to it as a record (prompt, level, answer, ``greedy`` or ``sample``, the temperature, the
    response's text, its reward)."""
    greedy: list[float] = []
    # None: the run's temperature, named mean@k; a number: an eval temperature, named mean@k_T<t>
    temps: list[float | None] = list(temperatures) or [None]
    sampled: dict[float | None, list[list[float]]] = {t: [] for t in temps}
    for i in range(0, len(examples), batch_prompts):
        chunk = list(examples[i:i + batch_prompts])
        roll = generate(model, tokenizer, chunk, task, group_size=1, temperature=1.0, top_p=1.0,
                        max_new_tokens=max_new_tokens, template=template, greedy=True, stop=stop)
        greedy += roll.rewards.tolist()
        if responses is not None:
            responses += _records(roll, "greedy", 1, None)
        for t in temps if samples > 0 else ():
            roll = generate(model, tokenizer, chunk, task, group_size=samples,
                            temperature=temperature if t is None else t, top_p=top_p,
                            max_new_tokens=max_new_tokens, template=template, stop=stop)
            sampled[t] += roll.rewards.view(len(chunk), samples).tolist()
            if responses is not None:
                responses += _records(roll, "sample", samples, t)
        if progress is not None:
            progress.update(len(chunk))
    by_level = defaultdict(list)
    for j, ex in enumerate(examples):
        by_level[ex.level].append(j)
    out: dict[str, float] = {"n": float(len(examples))}
    out.update({f"n/L{level}": float(len(idx)) for level, idx in sorted(by_level.items())})

    def add(name, values_of):
        for suffix, idx in [("", range(len(examples)))] + [(f"/L{lv}", i) for lv, i in sorted(by_level.items())]:
            mean, se = mean_se([values_of(j) for j in idx])
            out[name + suffix], out[f"{name}_se{suffix}"] = mean, se

    add("accuracy", lambda j: float(greedy[j] >= 1.0))
    for t, rows in sampled.items() if samples > 0 else ():
        add(sampled_name("mean", samples, t), lambda j, rows=rows: sum(r >= 1.0 for r in rows[j]) / samples)
        add(sampled_name("pass", samples, t),
            lambda j, rows=rows: pass_at_k(samples, sum(r >= 1.0 for r in rows[j]), samples))
    return dict(sorted(out.items(), key=lambda kv: eval_key_order(kv[0])))


def sampled_name(kind: str, samples: int, temperature: float | None) -> str:
    """``mean@8`` (sampled at the run's temperature), or ``mean@8_T0.6`` (at an eval temperature)."""
    return f"{kind}@{samples}" + ("" if temperature is None else f"_T{temperature:g}")


def _records(roll, kind: str, per_prompt: int, temperature: float | None) -> list[dict]:
    """One record per response of ``roll`` (``per_prompt`` consecutive rows per example)."""
    out = []
    for i, (text, r, t) in enumerate(zip(roll.texts, roll.rewards.tolist(), roll.truncated.tolist(), strict=True)):
        ex = roll.examples[i // per_prompt]
        out.append({"prompt": ex.prompt, "level": ex.level, "answer": ex.answer, "kind": kind,
                    **({} if temperature is None else {"temperature": temperature}), "response": text,
                    "reward": float(r), "truncated": bool(t)})
    return out


def eval_key_order(key: str) -> tuple:
    """The order of ``evaluate``'s keys: all levels first, then level by level; in each, n, then
    accuracy, mean@k, pass@k, each followed by its standard error."""
    base, _, level = key.partition("/L")
    name = base.removesuffix("_se")
    rank = -1 if name == "n" else 0 if name == "accuracy" else 1 if name.startswith("mean@") else 2
    return bool(level), int(level) if level.isdigit() else 0, rank, name, base.endswith("_se")


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error over prompts, sqrt(var / n) with the plug-in variance: for
    0/1 values (greedy accuracy) the binomial sqrt(p (1 - p) / n)."""
    x = torch.tensor(values, dtype=torch.float64)
    if x.numel() == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float((x.var(correction=0) / x.numel()).sqrt())


def metric_names(res: dict[str, float]) -> list[str]:
    """The metrics of an ``evaluate`` result (accuracy, mean@k, pass@k), without their standard
    errors, sizes and per-level keys."""
    return [k for k in res if "/" not in k and not k.endswith("_se") and k != "n"]


def with_se(res: dict[str, float], name: str, level: int | None = None) -> str:
    """``0.912 ± 0.020`` (the value and its standard error) of ``name`` [at ``level``]."""
    suffix = "" if level is None else f"/L{level}"
    value, se = res.get(name + suffix), res.get(f"{name}_se{suffix}")
    if value is None:
        return "n/a"
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"
