"""Intrinsic scores: each objective's task for both kinds of model, on the same tokens.

- MLM task (masked-token accuracy and cross-entropy). A fixed 15% of each held-out chunk's
  positions are the targets. An encoder sees `[CLS] chunk [SEP]` with all of them replaced by
  [MASK] at once and predicts them in place. A decoder sees `[CLS] chunk` unchanged and predicts
  each target from the tokens to its left (its logits one position earlier).
- CLM task (next-token accuracy and cross-entropy) on sampled positions p of each chunk. A
  decoder reads them from one forward over `[CLS] chunk`. An encoder gets one row per position,
  `[CLS] chunk[:p] [MASK]`, i.e. the prefix with the last position masked (no [SEP], since the
  text goes on), and predicts the [MASK].
- Perplexity (decoders only): exp of the mean next-token cross-entropy over every token of
  every chunk.

Both kinds are scored on the same positions of the same chunks, so the numbers compare
directly when the two models share a tokenizer (as Ettin pairs do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ettin.data.shards import DataError
from ettin.errors import CheckpointError
from ettin.eval.models import ScoringModel, TokenScores, masked_scores, next_token_scores

MLM_RATE = 0.15


def _summary(scores: Sequence[TokenScores]) -> dict[str, float]:
    logp = torch.cat([s.logprobs for s in scores]) if scores else torch.zeros(0)
    correct = torch.cat([s.correct for s in scores]) if scores else torch.zeros(0, dtype=torch.bool)
    if len(logp) == 0:
        return {"acc": math.nan, "ce": math.nan}
    return {"acc": float(correct.float().mean()), "ce": float(-logp.mean())}


def mlm_scores(
    model: ScoringModel, chunks: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Masked-token accuracy and cross-entropy at `positions` (indices into each chunk)."""
    shift = len(model.start_ids)
    rows = []
    for chunk, pos in zip(chunks, positions, strict=True):
        if model.kind == "encoder":
            ids = [*model.start_ids, *chunk, *model.end_ids]
        else:
            ids = [*model.start_ids, *chunk]
        rows.append((ids, [p + shift for p in pos]))
    if model.kind == "encoder":
        return _summary(masked_scores(model, rows))
    if shift == 0 and any(0 in pos for pos in positions):
        raise CheckpointError(
            f"{model.name}: a decoder without a start token ([CLS]/BOS) cannot predict a chunk's "
            "first token; export it with its tokenizer's start token"
        )
    return _summary(next_token_scores(model, rows))


def clm_scores(
    model: ScoringModel, chunks: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Next-token accuracy and cross-entropy at `positions`: the token at p given chunk[:p]."""
    shift = len(model.start_ids)
    if model.kind == "decoder":
        rows = [
            ([*model.start_ids, *chunk], [p + shift for p in pos])
            for chunk, pos in zip(chunks, positions, strict=True)
        ]
        return _summary(next_token_scores(model, rows))
    rows = [
        ([*model.start_ids, *chunk[: p + 1]], [p + shift])
        for chunk, pos in zip(chunks, positions, strict=True)
        for p in pos
    ]
    return _summary(masked_scores(model, rows))


def perplexity(model: ScoringModel, chunks: Sequence[Sequence[int]]) -> float:
    """A decoder's perplexity over every token of every chunk (given `[CLS]` and the prefix)."""
    if model.kind != "decoder":
        raise ValueError(f"{model.name}: perplexity is defined for decoders only")
    shift = len(model.start_ids)
    rows = [([*model.start_ids, *c], list(range(max(shift, 1), len(c) + shift))) for c in chunks]
    ce = _summary(next_token_scores(model, rows))["ce"]
    return math.exp(ce)


def chunk_tokens(streams: Sequence[Sequence[int]], length: int, count: int) -> list[list[int]]:
    """Up to `count` chunks of exactly `length` tokens, taken round-robin over the streams
    (one per held-out document) so that every document contributes."""
    per_stream = [
        [list(s[i : i + length]) for i in range(0, len(s) - length + 1, length)] for s in streams
    ]
    chunks: list[list[int]] = []
    depth = 0
    while len(chunks) < count and any(depth < len(c) for c in per_stream):
        for c in per_stream:
            if depth < len(c) and len(chunks) < count:
                chunks.append(c[depth])
        depth += 1
    return chunks


def tokenize_prefix(model: ScoringModel, text: str, count: int) -> list[int]:
    """The first `count` tokens of `text` (all if fewer), tokenizing only a prefix of it: a
    speech is ~10k tokens and the quick budget needs the first 128 of each."""
    chars = 8 * count
    while True:
        ids = model.tokenize(text[:chars])
        if chars >= len(text):
            return ids[:count]
        if len(ids) > count:  # the last token may be cut mid-word: it lies beyond `count`
            return ids[:count]
        chars *= 2


def sample_positions(
    length: int, count: int, generator: torch.Generator, low: int = 0
) -> list[int]:
    """`count` distinct sorted positions in [low, length), drawn with `generator`."""
    count = max(1, min(count, length - low))
    return sorted((torch.randperm(length - low, generator=generator)[:count] + low).tolist())


def evaluate_intrinsic(
    model: ScoringModel,
    texts: Sequence[str],
    *,
    seq_len: int = 128,
    num_chunks: int = 64,
    clm_positions: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """mlm_acc, mlm_ce, clm_acc, clm_ce (both kinds) and ppl (decoders; NaN for encoders).

    `texts` are held-out documents. Positions come from a generator seeded with `seed`, so two
    models with the same tokenizer are scored on exactly the same targets."""
    per_text = math.ceil(num_chunks / max(len(texts), 1))
    streams = [tokenize_prefix(model, t, per_text * seq_len) for t in texts]
    chunks = chunk_tokens(streams, seq_len, num_chunks)
    if not chunks:
        raise DataError(
            f"no held-out text of at least {seq_len} tokens to score: give longer held-out "
            "documents (or more of them)"
        )
    gen = torch.Generator().manual_seed(seed)
    mlm_pos = [sample_positions(len(c), round(MLM_RATE * len(c)), gen) for c in chunks]
    # CLM targets skip position 0, the first text token, which only a start token precedes.
    clm_pos = [sample_positions(len(c), clm_positions, gen, low=1) for c in chunks]
    mlm = mlm_scores(model, chunks, mlm_pos)
    clm = clm_scores(model, chunks, clm_pos)
    ppl = perplexity(model, chunks) if model.kind == "decoder" else math.nan
    return {
        "mlm_acc": mlm["acc"],
        "mlm_ce": mlm["ce"],
        "clm_acc": clm["acc"],
        "clm_ce": clm["ce"],
        "ppl": ppl,
    }
