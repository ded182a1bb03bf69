"""Custom tokenizers for prep: a byte-level BPE trained on a corpus, in the Ettin layout.

The Ettin tokenizer itself (offline rebuild, loading, special ids, fingerprints) lives in
`ettin.tokenizer`, below both `ettin.prep` and `ettin.data`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ettin.errors import PrepError
from ettin.tokenizer import NUM_UNUSED, SPECIAL_TOKENS, add_ettin_layout, save_tokenizer, wrap_fast


def train_tokenizer(
    files: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
) -> Path:
    """Train a byte-level BPE on text `files` with the Ettin special-token layout.

    `vocab_size` counts every id, the 88 special and unused tokens included (they come
    last, in the Ettin order); the learned part may be smaller if the data run out of merges.
    Saved like the Ettin tokenizer, so `load_tokenizer(out_dir)` and prep use it unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = [str(f) for f in files]
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise PrepError(f"train_tokenizer needs existing text files; missing: {missing or files}")
    reserved = len(SPECIAL_TOKENS) + NUM_UNUSED
    if vocab_size < 256 + reserved + 1:
        raise PrepError(f"vocab_size {vocab_size} is too small: at least {256 + reserved + 1}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - reserved,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train(files, trainer)
    fast = wrap_fast(add_ettin_layout(tok))
    return save_tokenizer(fast, Path(out_dir), {"source": "trained", "vocab_size": len(fast)})
