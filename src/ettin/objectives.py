"""The two objectives: the one place, besides the attention mask, where encoder and decoder differ.

MLM (encoder): each non-special position is selected with probability p; of the selected
positions 80% become [MASK], 10% a random *ordinary* token (never a special, added or
[unusedN] token) and 10% stay as they are; labels hold the original id at selected positions
and -100 elsewhere. The random draws come from a generator seeded by (seed, epoch, sample_id)
only, so a sample's mask is the same whatever the batch, rank, worker count or resumption, and
changes from epoch to epoch.

CLM (decoder): no labels; the model predicts each next token inside a sequence, so a sequence
of n tokens yields n - 1 targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

IGNORE_INDEX = -100
_UNUSED = re.compile(r"^\[unused\d+\]$|^<\|unused\d*\|>$")


def token_sets(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(special_ids, ordinary_ids) of a tokenizer, both sorted int64 arrays.

    special: every special token (CLS, SEP, PAD, MASK, UNK and any added token flagged
    special); these are never selected for masking. ordinary: the vocabulary minus specials,
    minus every added token (e.g. [unused0..82]) and anything named like [unusedN]; random
    replacements are drawn from these only.
    """
    special = set(int(i) for i in tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for i, tok in added.items():
        if getattr(tok, "special", False):
            special.add(int(i))
    excluded = special | {int(i) for i in added}
    vocab = tokenizer.get_vocab()
    ordinary = sorted(i for t, i in vocab.items() if i not in excluded and not _UNUSED.match(t))
    if not ordinary:
        raise ValueError("the tokenizer has no ordinary tokens to draw MLM replacements from")
    return np.asarray(sorted(special), np.int64), np.asarray(ordinary, np.int64)


def mask_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator of one sample's mask: a function of (seed, epoch, sample_id) only."""
    return np.random.default_rng([int(seed), int(epoch), int(sample_id)])


def mlm_mask(
    ids: np.ndarray,
    *,
    sample_id: int,
    epoch: int,
    seed: int,
    p: float,
    mask_id: int,
    special_ids: np.ndarray | Iterable[int],
    ordinary_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one sequence for masked-LM (80% [MASK] / 10% random / 10% kept)."""
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    rng = mask_rng(seed, epoch, sample_id)
    select_u, kind_u = rng.random(n), rng.random(n)
    pick = rng.integers(0, len(ordinary_ids), n)
    specials = np.asarray(special_ids, np.int64)
    if len(specials) <= 32:  # a few comparisons beat np.isin's sort for the usual handful
        is_special = np.zeros(n, bool)
        for s in specials.tolist():
            is_special |= ids == s
    else:
        is_special = np.isin(ids, specials)
    selected = (select_u < p) & ~is_special
    to_mask = selected & (kind_u < 0.8)
    to_random = selected & (kind_u >= 0.8) & (kind_u < 0.9)
    inputs = ids.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = np.asarray(ordinary_ids, np.int64)[pick[to_random]]
    labels = np.where(selected, ids, IGNORE_INDEX)
    return inputs, labels


def _name(objective: Any) -> str:
    name = getattr(objective, "name", objective)
    if name not in ("mlm", "clm"):
        raise ValueError(f"objective must be 'mlm' or 'clm', got {name!r}")
    return name


def num_sequences(attention_mask: Any) -> int:
    """Sequences in a batch: rows hold segment ids 1..k, so a row holds max(row) sequences."""
    return int(attention_mask.max(dim=1).values.clamp(min=0).sum())


def num_loss_tokens(batch: Mapping[str, Any], objective: Any) -> int:
    """Tokens that produce a loss term: MLM labels != -100; CLM sum of (len - 1) per sequence.

    Used to weight microbatches by tokens (`accumulate_train_batch_on_tokens`).
    """
    if _name(objective) == "mlm":
        return int((batch["labels"] != IGNORE_INDEX).sum())
    mask = batch["attention_mask"]
    return int((mask > 0).sum()) - num_sequences(mask)
