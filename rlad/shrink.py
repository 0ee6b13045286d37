"""``rlad drop-layers``: a smaller student cut from a pretrained model by removing decoder layers.

The compression the RLAD paper names is a smaller student distilled from a larger teacher that
shares its tokenizer. Where no smaller sibling of a model is at hand, depth pruning makes one:
the same model with some of its decoder layers removed, its embeddings, head, tokenizer and every
kept layer unchanged. RL with the teacher (``--algo rlad``, ``kdrl``, ``opd``) then recovers what
the cut lost.

Which layers. Depth-pruning studies agree that the first and the last layers matter most and that
dropping one contiguous block of deeper layers loses least (Minitron: Muralidharan et al. 2024,
Sreenivas et al. 2024; Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
Layers"). ``select="angular"`` (the default) follows Gromov et al.: of the contiguous blocks of
``n`` layers that keep the first and the last layer, drop the one whose output is closest to its
input, by the angular distance ``arccos(cos(h_in, h_out)) / pi`` averaged over the tokens of
calibration text (the task's prompts in the run's format, with their worked solutions): the block
that changes the representation least. ``select="last"`` drops the ``n`` layers just before the
last one, with no data. ``drop=[...]`` names the layers (0-based) outright.

The kept layers are renumbered (``layer_idx``, which indexes the KV cache) and the config says the
new depth (``num_hidden_layers``, and ``layer_types`` where the config has it). The folder is
written as ``rlad export`` writes one: to a temporary name, renamed into place, with
``rlad-drop-layers.json`` (the source, the layers kept and dropped, the distances measured).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence

# torch is imported inside the functions: `rlad --help` reads SELECT without loading it
SELECT = ("angular", "last")
MARKER = "rlad-drop-layers.json"


class ShrinkError(ValueError):
    """A layer cut that cannot be made: one line naming the setting and the fix."""


def decoder_layers(model):
    """The decoder's layer list (``model.model.layers`` in Llama, Mistral, Qwen, Gemma, ...)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ShrinkError(f"drop-layers: {type(model).__name__} keeps no `layers` list in its decoder; rlad "
                          f"drop-layers takes decoders built like Llama's (Llama, Mistral, Qwen, Gemma, SmolLM, ...)")
    return layers


def parse_layers(spec: Sequence[str], depth: int) -> list[int]:
    """``["3", "10-14"]`` -> [3, 10, 11, 12, 13, 14]: 0-based layer numbers, ranges inclusive."""
    out: list[int] = []
    for item in spec:
        for part in str(item).split(","):
            lo, sep, hi = part.strip().partition("-")
            try:
                a, b = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ShrinkError(f"--drop {part!r}: give layer numbers (0-based) and ranges like 10-14") from None
            if not 0 <= a <= b < depth:
                raise ShrinkError(f"--drop {part!r}: the model has layers 0-{depth - 1}")
            out += range(a, b + 1)
    if len(set(out)) != len(out):
        raise ShrinkError(f"--drop {' '.join(spec)}: a layer is named twice")
    return sorted(out)


def block_distances(model, batches: Sequence[tuple], n: int) -> list[float]:
    """For each start ``s`` in 0..L-n: the mean over the real tokens of ``batches`` (input ids and
    attention mask) of the angular distance between the hidden state entering layer ``s`` and the
    one leaving layer ``s + n - 1``. Measured with forward hooks on the layers themselves, so it
    does not depend on how a model reports ``output_hidden_states``."""
    import torch

    layers = decoder_layers(model)
    L = len(layers)
    states: dict[int, torch.Tensor] = {}

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    hooks = [layers[0].register_forward_pre_hook(lambda m, args, kwargs: states.__setitem__(-1, first(
        args[0] if args else kwargs["hidden_states"])), with_kwargs=True)]
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: states.__setitem__(i, first(out))))
    sums, count = torch.zeros(L - n + 1, dtype=torch.float64), 0
    try:
        was_training = model.training
        model.eval()
        for ids, mask in batches:
            states.clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            for s in range(L - n + 1):
                a, b = states[s - 1][real].double(), states[s + n - 1][real].double()
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
                sums[s] += (torch.arccos(cos) / math.pi).sum()
            count += int(real.sum())
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return (sums / max(count, 1)).tolist()


def choose_block(distances: Sequence[float], n: int, depth: int) -> int:
    """The start of the block to drop: the smallest distance among the blocks that keep the first
    and the last layer (start >= 1, end <= depth - 2); the earliest on a tie."""
    starts = [s for s in range(1, depth - n) if s < len(distances)]
    if not starts:
        raise ShrinkError(f"--keep {depth - n}: keeping the first and the last layer leaves no block of {n} to drop "
                          f"from {depth}; keep at least 2 layers")
    return min(starts, key=lambda s: (distances[s], s))


def drop_layers(model, drop: Sequence[int]):
    """Remove the decoder layers ``drop`` from ``model`` in place (returned): the kept layers are
    renumbered, the config records the new depth."""
    import torch

    layers = decoder_layers(model)
    depth = len(layers)
    gone = set(drop)
    keep = [i for i in range(depth) if i not in gone]
    if not keep:
        raise ShrinkError("drop-layers: every layer would be dropped; keep at least one")
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(decoder.layers):
        for module in layer.modules():  # the attention's cache slot, and any other per-layer index
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    for config in {id(c): c for c in (model.config, getattr(decoder, "config", model.config))}.values():
        config.num_hidden_layers = len(keep)
        if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == depth:
            config.layer_types = [config.layer_types[i] for i in keep]
    return model


def calibration_batches(tok, task, levels, n: int, template: str, seed: int = 0, batch: int = 8):
    """``n`` of the task's examples as text the model reads: the prompt in ``template`` and its
    worked solution (else ``#### answer``), ended with the EOS; left-padded batches."""
    from .rollout import from_pairs

    examples = task.sample(random.Random(seed), n, levels)
    out = []
    for i in range(0, n, batch):
        chunk = examples[i:i + batch]
        roll = from_pairs(tok, chunk, [e.solution or f"#### {e.answer}" for e in chunk], None, template=template,
                          device="cpu")
        out.append((roll.input_ids, roll.attention_mask))
    return out


def shrink(model_spec: str, out, *, keep: int | None = None, drop: Sequence[str] | None = None,
           select: str = "angular", task: str = "arithmetic", levels: Sequence[int] | None = None,
           calibration: int = 64, chat_template: str = "auto", overwrite: bool = False, log=print) -> dict:
    """``rlad drop-layers``: load ``model_spec`` (folder, hub id or GGUF) in float32, drop layers
    (``drop``, else a block chosen by ``select`` to leave ``keep``), write ``out``. Returns the
    record written to ``out/MARKER``."""
    import torch

    from .checkpoint import check_export_target
    from .models import load_model
    from .prompting import prompt_template
    from .rundir import staged_folder
    from .runtime import tokenizer_for
    from .tasks import get_task

    if (keep is None) == (drop is None):
        raise ShrinkError("drop-layers: give --keep N (the layers to keep; which ones are chosen by --select) or "
                          "--drop LAYERS (which to remove), one of the two")
    if select not in SELECT:
        raise ShrinkError(f"--select {select!r}: choose one of {', '.join(SELECT)}")
    check_export_target(model_spec, out, overwrite=overwrite, marker=MARKER, writer="rlad drop-layers folder",
                        source="model")
    tok = tokenizer_for(model_spec)
    model = load_model(model_spec, tok, dtype=torch.float32, role="model")
    depth = len(decoder_layers(model))
    record: dict = {"format": 1, "source": str(model_spec), "layers": depth}
    if drop is not None:
        dropped = parse_layers(drop, depth)
        how = "named by --drop"
    else:
        if not 1 <= keep < depth:
            raise ShrinkError(f"--keep {keep}: the model has {depth} layers; keep between 1 and {depth - 1}")
        n = depth - keep
        if select == "last":
            start = depth - 1 - n
            if start < 1:
                raise ShrinkError(f"--keep {keep}: dropping the {n} layers before the last would drop the first; "
                                  f"keep at least 2 layers")
            how = f"the {n} layers before the last (--select last)"
        else:
            t = get_task(task)
            lv = list(levels) if levels else list(t.levels)
            batches = calibration_batches(tok, t, lv, calibration, prompt_template(tok, "{prompt}\n", chat_template))
            log(f"measuring the angular distance across every block of {n} layers on {calibration} {task} examples "
                f"(levels {lv})", flush=True)
            distances = block_distances(model, batches, n)
            start = choose_block(distances, n, depth)
            record.update(calibration={"task": task, "levels": lv, "examples": calibration},
                          block_distances={str(s): round(d, 6) for s, d in enumerate(distances)})
            how = (f"the block of {n} with the smallest angular distance between its input and output "
                   f"({distances[start]:.4f}; first and last layer kept)")
        dropped = list(range(start, start + n))
    drop_layers(model, dropped)
    kept = [i for i in range(depth) if i not in set(dropped)]
    record.update(dropped=dropped, kept=kept, parameters=sum(p.numel() for p in model.parameters()))
    with staged_folder(out, replace=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log(f"dropped layers {_ranges(dropped)} of {depth} ({how}); kept {len(kept)}: "
        f"{record['parameters'] / 1e6:.1f}M parameters", flush=True)
    return record


def _ranges(xs: Sequence[int]) -> str:
    """[3, 10, 11, 12] -> "3, 10-12"."""
    out, xs = [], sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)
