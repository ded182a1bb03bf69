"""Batched document encoding with the fast tokenizer's own Rust backend.

Tokenize tasks receive the serialised `tokenizer.json` (kept in the prep work folder), so they
encode exactly as the transformers tokenizer does, post-processor included, without importing
transformers or torch. This module stays light on imports because every task imports it.
"""

from __future__ import annotations

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
