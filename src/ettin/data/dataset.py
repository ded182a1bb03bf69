"""One split of a prepared phase (MDS shards) as a map-style dataset of token-id arrays.

The split's layout and its file checks are `ettin.data.shards` (shards may sit in per-source
subfolders, as in the published phases). Shards are read with mosaicml-streaming's MDS readers; a remote
phase (s3://, gs://, hf://, ...), or a local one of compressed shards, is first fetched into
`local_cache` (`ettin.data.remote.fetch_split`: parallel, resumable, each shard checked).

`TokenDataset(...)[i]` is `(i, ids)` where `ids` (int64) has had the sample rules applied
(reference §4.2, with its bugs B12 fixed): prepend BOS ([CLS]) if missing; truncate to
`max_seq_len`; encoders end with EOS ([SEP]) (if the last token is not EOS, truncate to
`max_seq_len - 1` and append it); decoders keep EOS only where the data has it. Only
`input_ids` is touched. A sample holding PAD or an id outside the vocabulary is an error that
names its shard and row. Everything that can be checked before training (folders, index.json,
shard files and sizes, each shard's own sample count against index.json, column types, empty
split, tokenizer fingerprint; without meta.json, a sample of rows against the tokenizer's
[CLS] and vocabulary; the content hashes of small splits) is checked when the dataset is built,
and each problem raises a `DataError` that names the file and the fix. A sample that turns out
unreadable or impossible during training is checked against its shard's hash, so a damaged
shard is reported as corruption, not as a tokenizer mismatch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ettin.data.remote import RemoteError, fetch_split, needs_decompression, probe_remote
from ettin.data.shards import (
    INDEX,
    INPUT_IDS,
    META,
    DataError,
    check_shard_files,
    check_tokenizer,
    corruption_message,
    is_remote,
    join,
    local_path,
    read_index,
    read_meta,
    shard_hash_problem,
)

log = logging.getLogger(__name__)

HASH_CHECK_MAX_BYTES = 1 << 30
"""Splits at most this large (all shards together) have their content hashes checked when the
dataset is built (xxh64 reads ~1 GB/s or more); larger ones only with `ettin data verify`."""
META_CHECK_ROWS = 64
"""Rows checked against the tokenizer (first token [CLS], ids in the vocabulary) without meta.json."""


# --------------------------------------------------------------------------- sample rules


@dataclass(frozen=True)
class SampleRules:
    """BOS / truncation / EOS rules and the checks every sample goes through."""

    max_seq_len: int
    cls_id: int
    sep_id: int
    pad_id: int
    encoder: bool
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_seq_len < (3 if self.encoder else 2):
            raise ValueError(
                f"max_seq_len={self.max_seq_len} is too small to hold BOS, a token and EOS"
            )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, max_seq_len: int, encoder: bool) -> SampleRules:
        ids = {r: getattr(tokenizer, f"{r}_token_id", None) for r in ("cls", "sep", "pad")}
        missing = [r for r, i in ids.items() if i is None]
        if missing:
            raise DataError(
                f"the tokenizer has no {'/'.join(r.upper() for r in missing)} token; the data "
                f"rules need [CLS] (BOS), [SEP] (EOS) and [PAD]"
            )
        return cls(
            max_seq_len=max_seq_len,
            cls_id=ids["cls"],
            sep_id=ids["sep"],
            pad_id=ids["pad"],
            encoder=encoder,
            vocab_size=len(tokenizer),
        )

    def apply(self, raw: np.ndarray, where: str = "sample") -> np.ndarray:
        """The model's view of one stored sample (int64). `where` names it in errors."""
        ids = np.asarray(raw).astype(np.int64, copy=False)
        if ids.size and (ids == self.pad_id).any():
            pos = int(np.argmax(ids == self.pad_id))
            raise DataError(
                f"{where} contains the PAD id {self.pad_id} at position {pos}; stored samples must "
                f"be unpadded. Re-run `ettin prep` for this phase (or drop the sample)."
            )
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise DataError(
                f"{where} holds token id {int(ids.max())}, outside the tokenizer's {self.vocab_size} "
                f"ids: the shards were made with another tokenizer; use that tokenizer or re-run prep"
            )
        if ids.size == 0 or ids[0] != self.cls_id:
            ids = np.concatenate([[self.cls_id], ids])
        ids = ids[: self.max_seq_len]
        if self.encoder and ids[-1] != self.sep_id:
            ids = np.concatenate([ids[: self.max_seq_len - 1], [self.sep_id]])
        return ids


# --------------------------------------------------------------------------- where the split is


def _fetch_remote(remote: str, split: str, local_cache: str | None) -> Path:
    """Fetch `<remote>/meta.json` and the whole split into `local_cache`, in parallel, each shard
    checked against index.json before use (`ettin.data.remote.fetch_split`). `remote` may also be
    a local phase whose shards are compressed: they are decompressed into the cache."""
    if not local_cache:
        raise DataError(
            f"data.path={remote} is remote; set data.local_cache to a local folder to download it "
            f"into (data.order=streaming streams it within data.cache_limit instead)"
        )
    return fetch_split(remote, split, local_cache)


SPLIT_ALIASES = {"val": "validation", "validation": "val"}
"""Split names that stand for each other: `ettin prep` writes `val`, the published Ettin phases
(and the reference's `create_final_dataset_index.py`) `validation`."""


def _split_exists(path: str, split: str) -> bool:
    """Whether `<path>/<split>/index.json` is there (for a remote, one quick probe; schemes
    that cannot be probed count as present)."""
    if not is_remote(path):
        return (Path(path) / split / INDEX).is_file()
    try:
        probe_remote(join(path, split, INDEX))
    except RemoteError:
        return False
    return True


def resolve_split(path: str, split: str) -> str:
    """`split`, or its alias (`val` <-> `validation`) when only the alias is there."""
    other = SPLIT_ALIASES.get(split)
    if other and not _split_exists(path, split) and _split_exists(path, other):
        log.info("%s has no '%s' split; using '%s' (its other name)", path, split, other)
        return other
    return split


def _source_root(path: str, split: str, local_cache: str | None) -> Path:
    """The local phase folder to read: `path` itself, or `local_cache` after fetching `path`
    (remote) or decompressing it (a local split of compressed shards, with `local_cache` set)."""
    if is_remote(path):
        return _fetch_remote(path, split, local_cache)
    if local_cache:
        if needs_decompression(Path(path) / split):
            return _fetch_remote(path, split, local_cache)
    return Path(path)


# --------------------------------------------------------------------------- dataset


class TokenDataset(Dataset):
    """Map-style dataset over one split: `ds[i] -> (i, ids)` with the sample rules applied.

    Global sample ids follow the shard order of index.json (the reference's convention), so
    they name the same sample on every rank, in every worker, across runs.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        rules: SampleRules,
        *,
        tokenizer: Any = None,
        local_cache: str | None = None,
    ) -> None:
        from streaming.base.format import reader_from_json
        from streaming.base.spanner import Spanner

        path = local_path(path)  # a file:// URL is a local folder
        split = resolve_split(path, split)
        root = _source_root(path, split, local_cache)
        split_dir = root / split
        index = read_index(split_dir)
        check_shard_files(split_dir, index)
        meta = read_meta(root)
        check_tokenizer(meta, tokenizer, root)

        self.root, self.split, self.rules = root, split, rules
        self.shards = [reader_from_json(str(root), split, info) for info in index["shards"]]
        self.shard_names = [info["raw_data"]["basename"] for info in index["shards"]]
        self._raw_info = [info["raw_data"] for info in index["shards"]]
        self._hash_checked: dict[int, str | None] = {}
        # With a matching fingerprint in meta.json, the shards were written with this tokenizer:
        # an impossible id can then only come from damage, never from another tokenizer.
        self._tokenizer_checked = bool(
            meta and isinstance(meta.get("tokenizer") or meta.get("tokenizer_fingerprint"), dict)
        )
        sizes = np.asarray([s.samples for s in self.shards], np.int64)
        self.num_samples = int(sizes.sum())
        if self.num_samples == 0:
            raise DataError(
                f"split {split_dir} holds no samples; re-run `ettin prep` with more data"
            )
        self._spanner = Spanner(sizes)
        self._warned_truncation = False
        self._check_hashes_if_small()
        if meta is None and tokenizer is not None:
            self._check_rows_against_tokenizer()

    def _check_hashes_if_small(self) -> None:
        """Content hashes of every shard, before training, when the split is small enough."""
        total = sum(int(r.get("bytes", 0)) for r in self._raw_info)
        if total > HASH_CHECK_MAX_BYTES or not all(r.get("hashes") for r in self._raw_info):
            return
        for n in range(len(self.shards)):
            why = self._shard_hash_problem(n)
            if why:
                raise DataError(
                    corruption_message(self.root / self.split / self.shard_names[n], why)
                )

    def _shard_hash_problem(self, n: int) -> str | None:
        """Cached `shard_hash_problem` of shard n (None also when no hash is recorded)."""
        if n not in self._hash_checked:
            try:
                why = shard_hash_problem(
                    self.root / self.split / self.shard_names[n], self._raw_info[n]
                )
            except LookupError:
                why = None
            self._hash_checked[n] = why
        return self._hash_checked[n]

    def _check_rows_against_tokenizer(self) -> None:
        """Without meta.json: rows spread over the split must look like this tokenizer's output."""
        rules = self.rules
        for i in np.unique(np.linspace(0, self.num_samples - 1, META_CHECK_ROWS).astype(np.int64)):
            raw, shard, row = self._read(int(i))
            where = self._where(int(i), shard, row)
            first = int(raw[0]) if len(raw) else None
            if rules.vocab_size is not None and len(raw) and int(raw.max()) >= rules.vocab_size:
                problem = (
                    f"{where} holds token id {int(raw.max())}, outside the tokenizer's "
                    f"{rules.vocab_size} ids"
                )
            elif first != rules.cls_id:
                problem = (
                    f"{where} starts with id {first}, not the tokenizer's [CLS] id {rules.cls_id}"
                )
            else:
                continue
            raise DataError(
                f"{self.root / META} is missing, so the shards cannot be matched to the tokenizer, "
                f"and {problem}: the shards were made with another tokenizer. Use the tokenizer that "
                f"made them (config key `tokenizer`), or re-run `ettin prep` with this one (it writes "
                f"meta.json)"
            )

    def _damaged(self, i: int, shard: int, row: int, found: str) -> DataError | None:
        """A corruption error for sample `i` when its shard no longer holds what prep wrote.

        `found` says what was wrong with the sample, in words that blame nothing.
        """
        path = self.root / self.split / self.shard_names[shard]
        where = f"sample {i} (row {row}) {found}"
        why = self._shard_hash_problem(shard)
        if why:
            return DataError(f"{corruption_message(path, why)}; {where}")
        if self._raw_info[shard].get("hashes"):
            return None  # the content is what prep wrote: the sample's own error stands
        if self._tokenizer_checked:
            return DataError(
                f"shard file {path} is probably corrupted: {where}, yet meta.json says the shards "
                f"were made with this tokenizer. Re-run `ettin prep` for this phase or re-download "
                f"the shard (index.json records no hashes to confirm it)"
            )
        return None

    def __len__(self) -> int:
        return self.num_samples

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(
                f"sample {i} is outside {self.root / self.split} ({self.num_samples} samples)"
            )
        shard, row = self._spanner[i]
        return int(shard), int(row)

    def locate(self, i: int) -> tuple[str, int]:
        """(shard file, row in shard) of global sample `i`."""
        shard, row = self._locate(i)
        return self.shard_names[shard], row

    def _where(self, i: int, shard: int, row: int) -> str:
        return f"sample {i} (row {row} of shard {self.root / self.split / self.shard_names[shard]})"

    def _read(self, i: int) -> tuple[np.ndarray, int, int]:
        shard, row = self._locate(i)
        try:
            return self.shards[shard].get_item(row)[INPUT_IDS], shard, row
        except Exception as err:
            damaged = self._damaged(i, shard, row, f"cannot be decoded ({err})")
            if damaged is not None:
                raise damaged from err
            raise DataError(
                f"cannot read {self._where(i, shard, row)}: {err}. The shard is probably damaged: "
                f"run `ettin data verify {self.root}`, then re-run `ettin prep` or re-download it"
            ) from err

    def raw(self, i: int) -> np.ndarray:
        """The stored input_ids of sample `i` (uint32), before the sample rules."""
        return self._read(int(i))[0]

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        i = int(i)
        raw, shard, row = self._read(i)
        if (
            not self._warned_truncation
            and len(raw) + int(raw[:1].tolist() != [self.rules.cls_id]) > self.rules.max_seq_len
        ):
            self._warned_truncation = True
            log.warning(
                "%s: sample %d has %d tokens, more than max_seq_len=%d; long samples are truncated "
                "(prepare chunks of at most max_seq_len tokens to keep every token)",
                self.root / self.split,
                i,
                len(raw),
                self.rules.max_seq_len,
            )
        try:
            return i, self.rules.apply(raw, where=self._where(i, shard, row))
        except DataError as err:
            ids = np.asarray(raw)
            top = int(ids.max()) if ids.size else 0
            found = (
                f"holds id {top}, beyond the {self.rules.vocab_size}-id vocabulary"
                if self.rules.vocab_size is not None and top >= self.rules.vocab_size
                else "holds the PAD id"
            )
            damaged = self._damaged(i, shard, row, found)
            if damaged is not None:
                raise damaged from err
            raise
