"""The two objectives: the one place, besides the attention mask, where encoder and decoder differ.

MLM (encoder): each non-special position is selected with probability p; of the selected
positions 80% become [MASK], 10% a random *ordinary* token (never a special, added or
[unusedN] token) and 10% stay as they are; labels hold the original id at selected positions
and -100 elsewhere. Each token's random draws are a counter-based hash (splitmix64) of
(seed, epoch, sample_id, position) only, so a sample's mask is the same whatever the batch,
rank, worker count or resumption, changes from epoch to epoch, and a whole batch is masked in a
few vectorised numpy operations.

CLM (decoder): no labels; the model predicts each next token inside a sequence, so a sequence
of n tokens yields n - 1 targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic): a bijective hash."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(z: np.ndarray) -> np.ndarray:
    """uint64 hashes -> floats in [0, 1) (the top 53 bits)."""
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _mask_counters(
    seed: int, epochs: np.ndarray, sample_ids: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """(sum(lengths),) uint64 counters, one per token of the concatenated sequences: hashes of
    (seed, epoch, sample_id) plus 4 x position. Hashing counter + 0/1/2 gives a token's three
    independent draws (select, kind, replacement), computed for a whole batch at once."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(len(sample_ids), seed, np.uint64))
        key = _splitmix64(key ^ np.asarray(epochs, np.int64).astype(np.uint64))
        key = _splitmix64(key ^ np.asarray(sample_ids, np.int64).astype(np.uint64))
        starts = np.cumsum(lengths) - lengths
        positions = np.arange(int(np.sum(lengths)), dtype=np.int64) - np.repeat(starts, lengths)
        return np.repeat(key, lengths) + positions.astype(np.uint64) * np.uint64(4)


def mlm_mask_batch(
    seqs: Sequence[np.ndarray],
    *,
    sample_ids: Sequence[int],
    epochs: Sequence[int],
    seed: int,
    p: float,
    mask_id: int,
    special_ids: np.ndarray | Iterable[int],
    ordinary_ids: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) of each sequence for masked-LM (80% [MASK] / 10% random / 10% kept).

    Vectorised over the batch: every draw is a counter-based hash of (seed, epoch, sample_id,
    position), so a token's fate does not depend on the batch, the sequence's length, the rank,
    the worker count or resumption."""
    lengths = np.asarray([len(x) for x in seqs], np.int64)
    ids = np.concatenate(seqs).astype(np.int64) if len(seqs) else np.zeros(0, np.int64)
    counters = _mask_counters(seed, np.asarray(epochs), np.asarray(sample_ids), lengths)
    with np.errstate(over="ignore"):
        selected = _uniform(_splitmix64(counters)) < p
        specials = np.asarray(special_ids, np.int64)
        if len(specials) <= 32:  # a few comparisons beat np.isin's sort for the usual handful
            for s in specials.tolist():
                selected &= ids != s
        else:
            selected &= ~np.isin(ids, specials)
        idx = np.flatnonzero(selected)
        kind = _uniform(_splitmix64(counters[idx] + np.uint64(1)))
        rand = idx[(kind >= 0.8) & (kind < 0.9)]
        ordinary = np.asarray(ordinary_ids, np.int64)
        picks = _splitmix64(counters[rand] + np.uint64(2)) % np.uint64(len(ordinary))
    inputs = ids.copy()
    inputs[idx[kind < 0.8]] = mask_id
    inputs[rand] = ordinary[picks.astype(np.int64)]
    labels = np.full(len(ids), IGNORE_INDEX, np.int64)
    labels[idx] = ids[idx]
    cuts = np.cumsum(lengths)[:-1]
    return list(zip(np.split(inputs, cuts), np.split(labels, cuts)))


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
    """(inputs, labels) of one sequence; see `mlm_mask_batch`."""
    return mlm_mask_batch(
        [ids],
        sample_ids=[sample_id],
        epochs=[epoch],
        seed=seed,
        p=p,
        mask_id=mask_id,
        special_ids=special_ids,
        ordinary_ids=ordinary_ids,
    )[0]


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
