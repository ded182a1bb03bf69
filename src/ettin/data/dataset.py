"""One split of a prepared phase (MDS shards) as a map-style dataset of token-id arrays.

Layout written by `ettin prep`: `<phase>/meta.json` (with the tokenizer fingerprint) and
`<phase>/<split>/index.json` + shards whose columns are `input_ids: ndarray:uint32`,
`source: str`, `id: str`. Shards are read with mosaicml-streaming's MDS readers; a remote
phase (s3://, gs://, ...) is first fetched into `local_cache` by Streaming's own downloader.

`TokenDataset(...)[i]` is `(i, ids)` where `ids` (int64) has had the sample rules applied
(reference §4.2, with its bugs B12 fixed): prepend BOS ([CLS]) if missing; truncate to
`max_seq_len`; encoders end with EOS ([SEP]) (if the last token is not EOS, truncate to
`max_seq_len - 1` and append it); decoders keep EOS only where the data has it. Only
`input_ids` is touched. A sample holding PAD or an id outside the vocabulary is an error that
names its shard and row. Everything that can be checked before training (folders, index.json,
shard files and sizes, column types, empty split, tokenizer fingerprint) is checked when the
dataset is built, and each problem raises a `DataError` that names the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

INDEX = "index.json"
META = "meta.json"
INPUT_IDS = "input_ids"
INPUT_IDS_ENCODING = "ndarray:uint32"
_SHARD_KEYS = ("format", "raw_data", "samples", "column_names", "column_encodings")


class DataError(ValueError):
    """Prepared data that cannot be used as it is: says which file and what to do."""


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


# --------------------------------------------------------------------------- validation


def is_remote(path: str) -> bool:
    """True for URIs (s3://, gs://, ...) that Streaming must download."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"


def _fetch_remote(remote: str, split: str, local_cache: str | None) -> Path:
    """Download `<remote>/meta.json` and the whole split into `local_cache` with Streaming."""
    if not local_cache:
        raise DataError(
            f"data.path={remote} is remote; set data.local_cache to a local folder to download it into"
        )
    from composer.utils import dist
    from streaming.base.storage import CloudDownloader
    from streaming.base.stream import Stream
    from streaming.base.world import World

    root = Path(local_cache)
    with dist.run_local_rank_zero_first():
        meta_local = root / META
        if not meta_local.exists():
            try:
                CloudDownloader.direct_download(f"{remote.rstrip('/')}/{META}", str(meta_local))
            except Exception as err:  # a phase without meta.json is still usable (warned later)
                log.warning("could not download %s/%s: %s", remote, META, err)
        stream = Stream(remote=remote, local=str(root), split=split)
        stream.apply_default(
            {
                "split": split,
                "download_retry": 2,
                "download_timeout": 600,
                "validate_hash": None,
                "keep_zip": False,
            }
        )
        try:
            shards = stream.get_shards(World.detect(), allow_unsafe_types=False)
        except Exception as err:
            raise DataError(f"could not fetch {remote}/{split}/{INDEX} into {root}: {err}") from err
        for shard in shards:
            stream.prepare_shard(shard)  # download (and decompress) once; no-op if present
    return root


def read_index(split_dir: Path) -> dict:
    """index.json of a split, checked for the keys and column types the loader relies on."""
    if not split_dir.is_dir():
        raise DataError(
            f"split folder {split_dir} does not exist; prepare the phase with `ettin prep` "
            f"(or fix data.path / data.train_split / data.eval_split)"
        )
    index_file = split_dir / INDEX
    if not index_file.exists():
        raise DataError(
            f"{index_file} is missing: {split_dir} is not a finished MDS split; re-run `ettin prep`"
        )
    try:
        obj = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{index_file} is corrupted (not JSON: {err}); re-run `ettin prep` or re-download it"
        ) from err
    if (
        not isinstance(obj, dict)
        or obj.get("version") != 2
        or not isinstance(obj.get("shards"), list)
    ):
        raise DataError(
            f"{index_file} is not an MDS version-2 index (needs 'version': 2 and a 'shards' list); "
            f"re-run `ettin prep`"
        )
    for n, shard in enumerate(obj["shards"]):
        missing = [k for k in _SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
        if missing:
            raise DataError(
                f"{index_file}: shard #{n} lacks {', '.join(missing)}; re-run `ettin prep`"
            )
        if shard["format"] != "mds":
            raise DataError(
                f"{index_file}: shard #{n} has format {shard['format']!r}; only MDS shards are read"
            )
        name = (
            shard["raw_data"].get("basename", f"#{n}")
            if isinstance(shard["raw_data"], dict)
            else f"#{n}"
        )
        cols = dict(zip(shard["column_names"], shard["column_encodings"]))
        if INPUT_IDS not in cols:
            raise DataError(
                f"{index_file}: shard {name} has no '{INPUT_IDS}' column (columns: {sorted(cols)}); "
                f"the loader reads pre-tokenized shards written by `ettin prep`"
            )
        if cols[INPUT_IDS] != INPUT_IDS_ENCODING:
            raise DataError(
                f"{index_file}: shard {name} stores '{INPUT_IDS}' as {cols[INPUT_IDS]!r}, expected "
                f"{INPUT_IDS_ENCODING!r}; re-tokenize this phase with `ettin prep`"
            )
    return obj


def check_shard_files(split_dir: Path, index: dict) -> None:
    """Every shard file exists with exactly the size index.json records."""
    for shard in index["shards"]:
        raw = shard["raw_data"]
        path = split_dir / raw["basename"]
        if not path.exists():
            zipped = shard.get("zip_data") or {}
            hint = (
                f" (only the compressed {zipped['basename']} is there: decompress the split, or read it "
                f"through data.local_cache)"
                if zipped and (split_dir / zipped["basename"]).exists()
                else "; re-run `ettin prep` or copy the missing file"
            )
            raise DataError(f"shard file {path} listed in {split_dir / INDEX} is missing{hint}")
        size = path.stat().st_size
        if size != raw["bytes"]:
            raise DataError(
                f"shard file {path} has {size} bytes but {split_dir / INDEX} says {raw['bytes']}: it is "
                f"truncated or was overwritten; re-run `ettin prep` or copy it again"
            )


def read_meta(root: Path) -> dict | None:
    """The phase's meta.json, or None (with a warning) if there is none."""
    path = root / META
    if not path.exists():
        log.warning("%s not found: cannot check that the shards match the tokenizer", path)
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is corrupted (not JSON: {err}); re-run `ettin prep`") from err


def _fingerprint(tokenizer: Any) -> dict:
    try:
        from ettin.prep.tokenizer import tokenizer_fingerprint
    except ImportError:  # pragma: no cover - prep is part of the package
        tokenizer_fingerprint = None
    if tokenizer_fingerprint is not None:
        try:
            return tokenizer_fingerprint(tokenizer)
        except Exception:  # a minimal tokenizer object (tests); fall back to the essentials
            pass
    fp: dict = {"vocab_size": len(tokenizer)}
    for role in ("cls", "sep", "pad", "mask", "unk"):
        fp[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id", None)
    return fp


def check_tokenizer(meta: dict | None, tokenizer: Any, where: Path) -> None:
    """The tokenizer must be the one the shards were made with (same special ids, vocab)."""
    if meta is None or tokenizer is None:
        return
    stored = meta.get("tokenizer") or meta.get("tokenizer_fingerprint")
    if isinstance(stored, dict):
        actual = _fingerprint(tokenizer)
        keys = [k for k in stored if k in actual and stored[k] != actual[k]]
        keys.sort(key=lambda k: (not k.endswith("_id"), k))  # special ids first
        if keys:
            diffs = "; ".join(f"{k}: shards {stored[k]!r}, tokenizer {actual[k]!r}" for k in keys)
            raise DataError(
                f"the tokenizer differs from the one that made {where} ({diffs}). Use the phase's "
                f"tokenizer (config key `tokenizer`), or re-run `ettin prep` with this one."
            )
    top = meta.get("max_token_id")
    if isinstance(top, int) and top >= len(tokenizer):
        raise DataError(
            f"{where / META}: the shards hold token id {top} but the tokenizer has only "
            f"{len(tokenizer)} ids; use the tokenizer the shards were made with"
        )


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

        path = str(path)
        root = _fetch_remote(path, split, local_cache) if is_remote(path) else Path(path)
        split_dir = root / split
        index = read_index(split_dir)
        check_shard_files(split_dir, index)
        check_tokenizer(read_meta(root), tokenizer, root)

        self.root, self.split, self.rules = root, split, rules
        self.shards = [reader_from_json(str(root), split, info) for info in index["shards"]]
        self.shard_names = [info["raw_data"]["basename"] for info in index["shards"]]
        sizes = np.asarray([s.samples for s in self.shards], np.int64)
        self.num_samples = int(sizes.sum())
        if self.num_samples == 0:
            raise DataError(
                f"split {split_dir} holds no samples; re-run `ettin prep` with more data"
            )
        self._spanner = Spanner(sizes)
        self._warned_truncation = False

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
            raise DataError(f"cannot read {self._where(i, shard, row)}: {err}") from err

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
        return i, self.rules.apply(raw, where=self._where(i, shard, row))
