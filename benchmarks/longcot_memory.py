"""CPU peak memory of one training step against response length: fused loss vs materialized logits.

    python -m benchmarks.longcot_memory                                   # 1k..8k tokens, V=151936, H=128, 2 layers
    python -m benchmarks.longcot_memory --lengths 32 64 --vocab 1000 --out /tmp/x   # a smoke run

One step is what ``rlad train`` does per micro-batch holding one response: the decoder's hidden
states (``decoder_hidden``), the TRRD policy loss through ``linear_policy_loss`` (``impl="torch"``:
the vocabulary-chunked op, no ``[tokens x vocab]`` logits; ``impl="naive"``: materialized
logits and autograd), its backward, and an AdamW step (its first: the moments are allocated
inside the step). The model is a random-init Llama of a realistic vocabulary (Qwen3's 151,936 by
default) and a tiny body, so the lm_head is where the memory goes, as in a real model; with
``--checkpointing on`` the decoder layers recompute their activations in the backward
(``gradient_checkpointing_enable``, as ``--gradient-checkpointing`` does).

Each configuration runs in a fresh process. Memory is that process's resident-set high-water
mark (``VmHWM``), reset just before the step (``bench_memory_cpu.reset_peak``): ``peak`` is the
process's whole resident set at its highest during the step (python, torch, the model, its
inputs, the optimizer and everything the step allocates), ``step`` is the increase over the
resident set just before the step (model, inputs and old/teacher log-probs already there).
A configuration whose predicted peak exceeds ``--max-gib`` (or 60% of the memory available at
the start) is not run; its row says so, with the predicted size marked as computed, not
measured (predicted: the increase per token of the largest measured run of the same
configuration, times the tokens, plus the resident set before the step; before any run, four
float32 ``[tokens x vocab]`` tensors for naive, one for torch).

Writes ``<name>.md``, ``<name>.csv`` and ``<name>.png`` to ``--out`` (default
``benchmarks/results``), each with the device, torch and transformers versions, commit and date.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FIELDS = ["response_tokens", "impl", "checkpointing", "status", "peak_mib", "step_mib", "before_mib", "seconds",
          "predicted_peak_mib", "note"]
MIB = 1024 * 1024


def _child(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlad.models import decoder_hidden
    from rlad_kernels import LMHead, PolicyLossConfig, TokenInputs, linear_logprobs, linear_policy_loss

    from .bench_memory_cpu import reset_peak, status_kib

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    P, T, V = spec["prompt"], spec["tokens"], spec["vocab"]
    cfg = LlamaConfig(vocab_size=V, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                      intermediate_size=spec["intermediate"], max_position_embeddings=P + T,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg).float()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    head = LMHead(model.get_output_embeddings().weight)

    # one row: a prompt of P tokens and a response of T; targets are the response tokens
    ids = torch.randint(0, V, (1, P + T))
    mask = torch.ones_like(ids)
    pos = torch.arange(P + T)[None]
    targets = ids[:, 1:].clone()
    targets[:, :P - 1] = -100
    with torch.no_grad():  # the old policy's and the teacher's log-probs, as the trainer scores them beforehand
        h = decoder_hidden(model, ids, mask, pos)[:, :-1]
        old_logp = linear_logprobs(h, head, targets, impl="torch")
        del h
    teacher_logp = old_logp + 0.5 * torch.randn(old_logp.shape)
    advantages = torch.ones(targets.shape)
    normalizer = float((targets != -100).sum())

    before = reset_peak()
    t0 = time.perf_counter()
    h = decoder_hidden(model, ids, mask, pos)[:, :-1]
    tok = TokenInputs(advantages=advantages, old_logp=old_logp, teacher_logp=teacher_logp)
    out = linear_policy_loss(h, head, targets, tok, normalizer=normalizer, config=PolicyLossConfig(),
                             impl=spec["impl"])
    out.loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"peak_mib": peak / 1024, "before_mib": before / 1024, "step_mib": (peak - before) / 1024,
            "seconds": seconds, "params": params, "loss": float(out.loss)}


def _mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _predict(rows: list[dict], impl: str, ckpt: bool, tokens: int, vocab: int, base_mib: float) -> float:
    """Predicted peak MiB: the step's increase per response token of the largest measured run of
    the same configuration, scaled to ``tokens``, plus the resident set before that run's step
    (the model is the same; the inputs are O(tokens) and small); before any run, four float32
    ``[tokens x vocab]`` tensors for naive, one for torch, over ``base_mib``."""
    done = [r for r in rows if r["impl"] == impl and r["checkpointing"] == ("on" if ckpt else "off")
            and r["status"] == "ok"]
    if done:
        r = max(done, key=lambda r: r["response_tokens"])
        return r["before_mib"] + r["step_mib"] * tokens / r["response_tokens"]
    return base_mib + (4 if impl == "naive" else 1) * tokens * vocab * 4 / MIB


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, key in enumerate(sorted({(r["impl"], r["checkpointing"]) for r in rows})):
        rs = sorted((r for r in rows if (r["impl"], r["checkpointing"]) == key), key=lambda r: r["response_tokens"])
        color = f"C{i}"
        label = f"impl={key[0]}, checkpointing {key[1]}"
        ok = [r for r in rs if r["status"] == "ok"]
        if ok:
            ax.plot([r["response_tokens"] for r in ok], [r["peak_mib"] / 1024 for r in ok], marker="o", color=color,
                    label=label)
        skipped = [r for r in rs if r["status"] != "ok" and r["predicted_peak_mib"]]
        if skipped:
            ax.plot([r["response_tokens"] for r in skipped], [r["predicted_peak_mib"] / 1024 for r in skipped],
                    marker="o", markerfacecolor="none", linestyle=":", color=color,
                    label=f"{label}: computed, not run")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="response tokens (one sequence)", ylabel="peak resident memory (GiB)",
           title="one training step: forward + backward + AdamW")
    ticks = sorted({r["response_tokens"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.longcot_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="response tokens")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size (151936: Qwen3's)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--impls", nargs="+", default=["torch", "naive"], choices=["torch", "naive"])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gib", type=float, default=10.0, help="skip a configuration predicted to peak above this")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="longcot_memory")
    ap.add_argument("--replot", action="store_true", help="only draw <name>.png again from <name>.csv")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.replot:
        path = Path(args.out) / f"{args.name}.csv"
        text = path.read_text().splitlines()
        rows = list(csv.DictReader(line for line in text if not line.startswith("#")))
        for r in rows:
            r["response_tokens"] = int(r["response_tokens"])
            for k in ("peak_mib", "predicted_peak_mib"):
                r[k] = float(r[k]) if r[k] else ""
        _plot(rows, path.with_suffix(".png"), text[0].lstrip("# "))
        return 0

    import torch
    import transformers

    from .harness import env_info

    env = env_info(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit_mib = min(args.max_gib * 1024, 0.6 * _mem_available_mib())
    shape = (f"random-init Llama, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
             f"({args.kv_heads} kv), MLP {args.intermediate}, tied embeddings, float32; prompt {args.prompt} tokens; "
             f"TRRD policy loss (alpha 0.5, c 1); {args.threads} thread(s)")
    print(f"{shape}\n{env['device']}, torch {env['torch']}, limit {limit_mib / 1024:.1f} GiB", flush=True)
    rows: list[dict] = []
    from .bench_memory_cpu import status_kib

    base_mib = status_kib("VmRSS") / 1024  # until a run says otherwise: this process's (python and torch imported)
    measured_base = False
    for ckpt in args.checkpointing:
        for impl in args.impls:
            for T in sorted(args.lengths):
                row = {"response_tokens": T, "impl": impl, "checkpointing": ckpt, "status": "", "peak_mib": "",
                       "step_mib": "", "before_mib": "", "seconds": "", "predicted_peak_mib": "", "note": ""}
                pred = _predict(rows, impl, ckpt == "on", T, args.vocab, base_mib)
                if pred > limit_mib:
                    row.update(status="not run", predicted_peak_mib=round(pred),
                               note=f"would need about {pred / 1024:.1f} GiB (computed, not measured) > the "
                                    f"{limit_mib / 1024:.1f} GiB limit")
                    rows.append(row)
                    print(f"  T={T:>6} {impl:<6} ckpt {ckpt:<3} not run: {row['note']}", flush=True)
                    continue
                spec = dict(vars(args), tokens=T, impl=impl, checkpointing=ckpt == "on")
                spec = {k: v for k, v in spec.items() if k not in ("lengths", "impls", "out", "name", "child")}
                r = subprocess.run([sys.executable, "-m", "benchmarks.longcot_memory", "--child", json.dumps(spec)],
                                   capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1][:160]
                    row.update(status="error", note=why)
                    rows.append(row)
                    print(f"  T={T:>6} {impl:<6} ckpt {ckpt:<3} error: {why}", flush=True)
                    continue
                m = json.loads(r.stdout.strip().splitlines()[-1])
                if not measured_base:
                    base_mib, measured_base = m["before_mib"], True
                row.update(status="ok", peak_mib=round(m["peak_mib"]), step_mib=round(m["step_mib"]),
                           before_mib=round(m["before_mib"]), seconds=round(m["seconds"], 1),
                           predicted_peak_mib=round(pred), note=f"{m['params'] / 1e6:.1f}M parameters")
                rows.append(row)
                print(f"  T={T:>6} {impl:<6} ckpt {ckpt:<3} peak {m['peak_mib']:>8.0f} MiB, step +{m['step_mib']:>7.0f}"
                      f" MiB over {m['before_mib']:.0f} MiB, {m['seconds']:.1f} s", flush=True)

    stamp = (f"{env['device']}; torch {env['torch']}, transformers {transformers.__version__}; commit {env['commit']}; "
             f"{env['date']}")
    command = "python -m benchmarks.longcot_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    with (out / f"{args.name}.csv").open("w", newline="") as f:
        f.write(f"# {stamp}\n# {shape}\n# {command.strip()}\n")
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# One training step's peak memory against response length (CPU)", "",
             f"- machine: {stamp}", f"- model: {shape}", f"- command: `{command.strip()}`",
             "- peak: the process's resident-set high-water mark during the step (VmHWM), everything included; "
             "step: its increase over the resident set just before the step; one run each, a fresh process per row",
             "", "| response tokens | impl | checkpointing | peak (MiB) | step (MiB) | time (s) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['response_tokens']} | {r['impl']} | {r['checkpointing']} | {r['peak_mib']} | "
                     f"{r['step_mib']} | {r['seconds']} | {r['status'] if r['status'] != 'ok' else ''}"
                     f"{': ' if r['status'] != 'ok' else ''}{r['note'] if r['status'] != 'ok' else ''} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / f"{args.name}.png", stamp)
    print(f"wrote {out / args.name}.md, .csv, .png", flush=True)
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
