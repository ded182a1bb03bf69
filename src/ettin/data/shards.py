"""A prepared split on disk: index.json, the shard files and their checks (the lowest data room).

Layout written by `ettin prep` (and by the reference's `MDSWriter` + `merge_index`):
`<phase>/meta.json` (with the tokenizer fingerprint) and `<phase>/<split>/index.json` + shards
whose columns include `input_ids: ndarray:uint32`. A shard's `basename` in index.json is its
path relative to the split folder: `shard.00000.mds` for `ettin prep`, `dclm/shard.00000.mds`
(`.zstd` compressed) for the published phases, whose per-source subfolders are merged into one
index (the subfolders' own index.json files are ignored).

Everything here reads files and names what is wrong with them (`DataError`, one line naming the
file and the fix); the dataset (`ettin.data.dataset`), the fetcher (`ettin.data.remote`) and the
CLI (`ettin data verify`) all build on it. No torch or Composer is imported, and Streaming only
to decompress a compressed shard (`decompress`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ettin.tokenizer import tokenizer_fingerprint

log = logging.getLogger(__name__)

INDEX = "index.json"
META = "meta.json"
INPUT_IDS = "input_ids"
INPUT_IDS_ENCODING = "ndarray:uint32"
_SHARD_KEYS = ("format", "raw_data", "samples", "column_names", "column_encodings")
PREFERRED_HASHES = ("xxh64", "xxh3_64", "sha1", "md5", "sha256")
"""Which of a shard's recorded hashes to check (the fastest available first)."""


class DataError(ValueError):
    """Prepared data that cannot be used as it is: says which file and what to do."""


# --------------------------------------------------------------------------- paths


def is_remote(path: str) -> bool:
    """True for URIs (s3://, gs://, ...) that Streaming must download (`file://` is local)."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"


def local_path(path: str | os.PathLike) -> str:
    """`path` with a `file://` URL turned into the local path it names (`file:///data/x` ->
    `/data/x`, percent-escapes decoded); anything else unchanged. `Path("file:///x")` would
    collapse the slashes into a relative `file:/x`."""
    text = str(path)
    url = urllib.parse.urlparse(text)
    if url.scheme != "file":
        return text
    if url.netloc not in ("", "localhost"):
        raise DataError(
            f"{text} names a file on host {url.netloc!r}; a file:// URL must be local "
            f"(file:///absolute/path), or use a remote scheme such as s3://"
        )
    return urllib.parse.unquote(url.path)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for URLs and local paths alike."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


# --------------------------------------------------------------------------- index and shards


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
        for key in ("raw_data", "zip_data"):
            rel = (
                (shard.get(key) or {}).get("basename") if isinstance(shard.get(key), dict) else None
            )
            if rel is not None and (
                not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/")
            ):
                raise DataError(
                    f"{index_file}: shard #{n} has {key} basename {rel!r}; a shard must be a path "
                    f"inside its split folder (e.g. shard.00000.mds or dclm/shard.00000.mds)"
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
                f" (only the compressed {zipped['basename']} is there: decompress the split with "
                f"`ettin data decompress {split_dir}`, or set data.local_cache to a folder to "
                f"decompress it into)"
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
        check_shard_header(path, int(shard["samples"]), split_dir / INDEX)


def check_shard_header(
    path: Path, samples: int, index_file: Path, data: bytes | None = None
) -> None:
    """An MDS shard's own header (uint32 sample count, then count + 1 uint32 offsets whose last is
    the file size) must agree with index.json's `samples`: otherwise the global sample ids, and
    so the data order, would silently refer to other samples. `data`: the shard's bytes, when
    they are not in `path` (a compressed shard, decompressed in memory)."""
    if data is None:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
            table = f.read(4 * (struct.unpack("<I", head)[0] + 1)) if len(head) == 4 else b""
    else:
        size, head = len(data), data[:4]
        table = data[4 : 4 * (struct.unpack("<I", head)[0] + 2)] if len(head) == 4 else b""
    if len(head) < 4:
        raise DataError(
            f"shard file {path} is too short to hold an MDS header; it is damaged: re-run "
            f"`ettin prep` or re-download it"
        )
    (count,) = struct.unpack("<I", head)
    if count != samples:
        raise DataError(
            f"{index_file} says shard {path.name} holds {samples} samples, but the shard file's "
            f"own header says {count}: index.json does not belong to these shards (edited, or "
            f"from another write). Re-run `ettin prep` for this phase or re-download the split"
        )
    offsets = np.frombuffer(table, np.uint32) if len(table) == 4 * (count + 1) else None
    if (
        offsets is None
        or int(offsets[0]) < 4 * (count + 2)
        or int(offsets[-1]) != size
        or (np.diff(offsets.astype(np.int64)) < 0).any()
    ):
        raise DataError(
            f"shard file {path} is corrupted: its table of sample offsets does not fit the file "
            f"({size} bytes). Re-run `ettin prep` for this phase or re-download the shard"
        )


def _hasher(algo: str) -> Callable[[], Any] | None:
    if algo in hashlib.algorithms_available:
        return lambda: hashlib.new(algo)
    try:
        import xxhash
    except ImportError:
        return None
    return getattr(xxhash, algo, None)


def shard_hash_problem(path: Path, raw: dict, data: bytes | None = None) -> str | None:
    """None if the shard file's content (or `data`, its bytes) matches a hash index.json records
    for it; else why not.

    Raises `LookupError` when index.json records no hash this environment can compute.
    """
    recorded = raw.get("hashes") or {}
    algo = next((a for a in PREFERRED_HASHES if a in recorded and _hasher(a)), None)
    if algo is None:
        algo = next((a for a in recorded if _hasher(a)), None)
    if algo is None:
        raise LookupError(f"index.json records no usable hash for {path.name}")
    h = _hasher(algo)()
    if data is not None:
        h.update(data)
    else:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    if h.hexdigest() != recorded[algo]:
        return f"its {algo} hash is {h.hexdigest()}, index.json recorded {recorded[algo]}"
    return None


def corruption_message(path: Path, why: str) -> str:
    return (
        f"shard file {path} is corrupted ({why}): its content is not what `ettin prep` wrote. "
        f"Re-run `ettin prep` for this phase or re-download the shard; `ettin data verify "
        f"{path.parent.parent}` checks every shard"
    )


def decompress(algo: str, data: bytes) -> bytes:
    """A compressed shard's bytes decompressed with Streaming's codec `algo` (e.g. "zstd")."""
    from streaming.base.compression import decompress as _decompress

    return _decompress(algo, data)


@dataclass
class SplitCheck:
    """What `verify_split` checked in one split, and the problems it found (one line each)."""

    split: Path
    shards: int = 0
    bytes: int = 0
    """Raw bytes of the shards (what training reads)."""
    hashed: int = 0
    """Shards whose content matched a hash that index.json records."""
    unhashed: int = 0
    """Shards without a recorded hash (`hashes: {}`, as the reference's writer leaves them):
    their size, MDS header and offset table were checked, their content no further."""
    compressed: int = 0
    """Shards present only compressed (`zip_data`, e.g. `.mds.zstd`): the compressed file was
    checked (size, hash if recorded), then its decompressed bytes as a raw shard's."""
    problems: list[str] = field(default_factory=list)


def _check_compressed(split_dir: Path, shard: dict) -> bool:
    """Check a shard present only compressed (see `SplitCheck.compressed`); True when a content
    hash (of the compressed or the decompressed bytes) was recorded and matched."""
    raw, zipped, index_file = shard["raw_data"], shard["zip_data"], split_dir / INDEX
    zpath = split_dir / zipped["basename"]
    size = zpath.stat().st_size
    if "bytes" in zipped and size != int(zipped["bytes"]):
        raise DataError(
            f"compressed shard file {zpath} has {size} bytes but {index_file} says "
            f"{zipped['bytes']}: it is truncated or was overwritten; re-download it"
        )
    hashed = False
    try:
        why = shard_hash_problem(zpath, zipped)
        hashed = True
    except LookupError:
        why = None
    if why:
        raise DataError(corruption_message(zpath, why))
    algo = shard.get("compression") or "zstd"
    try:
        data = decompress(algo, zpath.read_bytes())
    except Exception as err:  # the codec's own error types
        raise DataError(
            f"compressed shard file {zpath} does not decompress with {algo!r} ({err}): it is "
            f"damaged; re-download it"
        ) from None
    if len(data) != int(raw["bytes"]):
        raise DataError(
            f"compressed shard file {zpath} decompresses to {len(data)} bytes but {index_file} "
            f"says {raw['bytes']}: it does not belong to this index.json; re-download it"
        )
    check_shard_header(zpath, int(shard["samples"]), index_file, data=data)
    try:
        why = shard_hash_problem(zpath, raw, data=data)
        hashed = True
    except LookupError:
        why = None
    if why:
        raise DataError(corruption_message(zpath, f"decompressed, {why}"))
    return hashed


def verify_split(split_dir: Path, progress: Callable[[int], None] | None = None) -> SplitCheck:
    """Check every shard of a split: file, size, header, and content hash where index.json
    records one; a shard present only compressed is checked compressed and decompressed (in
    memory). `progress(bytes)` is called after each shard. Returns what was checked and the
    problems (one line each; none when all is well)."""
    index = read_index(split_dir)
    check = SplitCheck(split_dir)
    for shard in index["shards"]:
        raw, zipped = shard["raw_data"], shard.get("zip_data")
        path = split_dir / raw["basename"]
        check.shards += 1
        check.bytes += int(raw.get("bytes", 0))
        try:
            if zipped and not path.exists() and (split_dir / zipped["basename"]).is_file():
                hashed = _check_compressed(split_dir, shard)
                check.compressed += 1
            else:
                check_shard_files(split_dir, {"shards": [shard]})
                try:
                    why = shard_hash_problem(path, raw)
                    hashed = True
                except LookupError:
                    why, hashed = None, False
                if why:
                    raise DataError(corruption_message(path, why))
            if hashed:
                check.hashed += 1
            else:
                check.unhashed += 1
        except DataError as err:
            check.problems.append(str(err))
        if progress is not None:
            progress(int(raw.get("bytes", 0)))
    return check


def verified(checks: Iterable[SplitCheck], root: Path) -> str:
    """One line saying what `verify_split` checked in `checks` (all without problems)."""
    checks = list(checks)
    n, k = sum(c.shards for c in checks), len(checks)
    hashed, unhashed = sum(c.hashed for c in checks), sum(c.unhashed for c in checks)
    compressed = sum(c.compressed for c in checks)
    total = sum(c.bytes for c in checks)
    out = (
        f"{n} shards in {k} split{'' if k == 1 else 's'} under {root} ({total:,} bytes): sizes, "
        f"MDS headers and sample offsets match index.json"
    )
    if hashed:
        out += f"; {hashed} match their recorded content hashes"
    if unhashed:
        out += (
            f"; {unhashed} have no content hash in index.json (`hashes: {{}}`, as the reference's "
            f"writer leaves them), so for those only sizes and headers were checked"
        )
    if compressed:
        out += (
            f"; {compressed} are only compressed (zip_data): each compressed file and its "
            f"decompressed bytes were checked (train on them with data.local_cache, or `ettin "
            f"data decompress`)"
        )
    return out


def split_dirs(root: Path) -> list[Path]:
    """Every MDS split (a folder with index.json) at or under `root`, skipping temp folders and
    the subfolders of a merged split at any depth (per source, per chunk: their index.json files
    are part of the split's)."""
    if (root / INDEX).is_file():
        return [root]
    found = sorted(
        p.parent
        for p in root.rglob(INDEX)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return [d for d in found if not any(o in d.parents for o in found)]


def read_meta(root: Path) -> dict | None:
    """The phase's meta.json, or None (with a warning) if there is none."""
    path = root / META
    if not path.exists():
        log.warning(
            "%s not found: the tokenizer fingerprint cannot be checked; checking sampled rows "
            "against the tokenizer's [CLS] and vocabulary instead",
            path,
        )
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is corrupted (not JSON: {err}); re-run `ettin prep`") from err


def fingerprint(tokenizer: Any) -> dict:
    """`ettin.tokenizer.tokenizer_fingerprint`, or for a minimal tokenizer object (tests) its
    size and special ids."""
    try:
        return tokenizer_fingerprint(tokenizer)
    except Exception:  # no vocabulary to hash: fall back to the essentials
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
        actual = fingerprint(tokenizer)
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
