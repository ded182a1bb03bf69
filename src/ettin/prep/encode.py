"""Batched document encoding, in this process or in a pool of worker processes.

Workers receive the fast tokenizer's own Rust backend (serialised `tokenizer.json`), so
they encode exactly as the transformers tokenizer does, post-processor included, without
importing transformers or torch. Results come back in input order whatever `num_proc` is.
This module stays light on imports because spawned workers import it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from ettin.errors import PrepError


class BodyEncoder:
    """Encodes texts as `[CLS] body [SEP]` and returns the bodies, concatenated, with lengths."""

    def __init__(self, tokenizer_json: str, cls_id: int, sep_id: int) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.cls_id, self.sep_id = cls_id, sep_id
        self._encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        bodies = []
        for enc in self._encode(texts, add_special_tokens=True):
            ids = enc.ids
            if len(ids) < 2 or ids[0] != self.cls_id or ids[-1] != self.sep_id:
                raise PrepError(
                    f"the tokenizer did not wrap a document as [CLS] ... [SEP] "
                    f"({self.cls_id} ... {self.sep_id}); got {ids[:3]} ... {ids[-3:]}"
                )
            bodies.append(ids[1:-1])
        lengths = np.array([len(b) for b in bodies], dtype=np.int64)
        arrays = [np.asarray(b, dtype=np.uint32) for b in bodies]
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        return flat, lengths


_WORKER: BodyEncoder | None = None


def _init_worker(tokenizer_json: str, cls_id: int, sep_id: int) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER = BodyEncoder(tokenizer_json, cls_id, sep_id)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _WORKER(texts)


class BatchEncoder:
    """Encodes batches of texts in input order, in this process or in `num_proc` workers.

    With `num_proc > 1` a spawn-context Pool is started once and reused for every source;
    at most `4 * num_proc` batches are in flight, so reading never runs far ahead of encoding.
    Use as a context manager (the pool is closed on exit).
    """

    def __init__(self, tokenizer_json: str, cls_id: int, sep_id: int, num_proc: int = 1) -> None:
        self.num_proc = max(1, num_proc)
        self._local: BodyEncoder | None = None
        self._pool = None
        if self.num_proc == 1:
            self._local = BodyEncoder(tokenizer_json, cls_id, sep_id)
        else:
            ctx = mp.get_context("spawn")
            self._pool = ctx.Pool(self.num_proc, _init_worker, (tokenizer_json, cls_id, sep_id))

    def map(self, batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(flat bodies uint32, body lengths int64)` per batch, in input order."""
        if self._local is not None:
            for texts in batches:
                yield self._local(texts)
            return
        assert self._pool is not None
        pending: deque = deque()
        for texts in batches:
            pending.append(self._pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= 4 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> BatchEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
