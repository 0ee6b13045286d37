"""The built-in tokenizer's vocabulary, learned from the built-in tasks' own text: a byte-level
BPE (digits always split one per token, so numbers tokenize uniformly), saved in the Hugging
Face format under ``rlad/assets/tokenizer`` (``rlad.tokenizer.ASSET``). Deterministic; rebuild
it with ``python -m rlad.tasks.vocabulary``.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..tokenizer import ASSET, SPECIALS, VOCAB_SIZE
from . import BUILTIN


def corpus(n_per_level: int = 300, seed: int = 0):
    rng = random.Random(seed)
    for name in sorted(BUILTIN):
        task = BUILTIN[name]()
        for level in task.levels:
            for _ in range(n_per_level):
                ex = task.make(rng, level)
                yield ex.prompt + "\n" + (ex.solution or ex.answer)


def build_tokenizer(out_dir=ASSET, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS, padding_side="left")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


if __name__ == "__main__":
    t = build_tokenizer()
    print(f"wrote {ASSET} (vocabulary {len(t)})")
