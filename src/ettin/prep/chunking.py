"""Cutting encoded documents into training chunks of at most C tokens.

Each document arrives encoded by the tokenizer's post-processor as `[CLS] body [SEP]`. The rules
(those of the reference Ettin data scripts, made runnable and exact):

1. A document of at most C tokens is one chunk, unchanged, however short.
2. A longer one has its body split at multiples of C-2, and every piece becomes
   `[CLS] piece [SEP]`, so every chunk starts with CLS, ends with SEP and is at most C long.
3. A non-first chunk shorter than `min_chunk_tokens` (counted with CLS and SEP) is dropped.
   (Only the last chunk of a document can be that short.)
4. Optional backfill: a non-first chunk still shorter than `backfill_below` takes r tokens from
   the tail of the previous chunk's body, r drawn by the caller's seeded generator so that both
   chunks end up at least `backfill_below` long. Tokens are moved, never duplicated.

Empty documents (no body) give no chunk. Special ids always come from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class ChunkRules:
    """How to cut documents for one phase."""

    context_length: int
    """C: the longest chunk, CLS and SEP included."""
    min_chunk_tokens: int = 32
    """Non-first chunks shorter than this are dropped."""
    backfill_below: int = 0
    """If > 0, non-first chunks shorter than this are backfilled from the previous chunk."""

    def __post_init__(self) -> None:
        c = self.context_length
        if c < 3:
            raise ValueError(f"context_length must be at least 3 (CLS + a token + SEP), got {c}")
        if not 0 <= self.min_chunk_tokens <= c:
            raise ValueError(f"min_chunk_tokens must be in [0, {c}], got {self.min_chunk_tokens}")
        if self.backfill_below and not self.min_chunk_tokens <= self.backfill_below <= c // 2:
            raise ValueError(
                f"backfill_below must be 0 (off) or in [min_chunk_tokens={self.min_chunk_tokens},"
                f" context_length/2={c // 2}], got {self.backfill_below}"
            )


def chunk_spans(
    body_len: int, rules: ChunkRules, rng: np.random.Generator | None = None
) -> list[tuple[int, int]]:
    """The `[start, end)` spans of a body of `body_len` tokens, one per kept chunk.

    `rng` is needed only when backfill applies to this document.
    """
    if body_len <= 0:
        return []
    step = rules.context_length - 2
    spans = [(s, min(s + step, body_len)) for s in range(0, body_len, step)]
    if len(spans) == 1:
        return spans
    last = spans[-1][1] - spans[-1][0] + 2
    if last < rules.min_chunk_tokens:
        return spans[:-1]
    if rules.backfill_below and last < rules.backfill_below:
        if rng is None:
            raise ValueError("backfill needs a seeded numpy Generator (rng)")
        # The previous chunk is full (C tokens): move r tokens so both stay >= backfill_below.
        r = int(
            rng.integers(
                rules.backfill_below - last, rules.context_length - rules.backfill_below + 1
            )
        )
        (ps, pe), (ls, le) = spans[-2], spans[-1]
        spans[-2:] = [(ps, pe - r), (ls - r, le)]
    return spans


def chunk_document(
    ids: Sequence[int],
    rules: ChunkRules,
    cls_id: int,
    sep_id: int,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Cut one `[CLS] body [SEP]` encoding into uint32 chunks that each start with CLS and end with SEP."""
    ids = np.asarray(ids, dtype=np.uint32)
    if len(ids) < 2 or ids[0] != cls_id or ids[-1] != sep_id:
        raise ValueError(f"expected an encoding [CLS] ... [SEP] ({cls_id} ... {sep_id})")
    body = ids[1:-1]
    head, tail = np.array([cls_id], np.uint32), np.array([sep_id], np.uint32)
    return [np.concatenate([head, body[s:e], tail]) for s, e in chunk_spans(len(body), rules, rng)]
