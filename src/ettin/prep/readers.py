"""Document readers: each yields `(doc_id, text)` pairs in a deterministic order.

Formats:
- `jsonl`: JSON Lines files (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), one object per line;
- `parquet`: Parquet files with a text column;
- `text`: plain-text files, one document per file;
- `hf_disk`: a Hugging Face `datasets` dataset written with `save_to_disk` (needs `datasets`).

A path may be one file or a folder; folders are searched recursively with a glob and the files
are read in sorted relative-path order, so the same folder always gives the same sequence.
A record without an id gets `<relative file>:<line or row>` (or its row index for `hf_disk`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ettin.errors import PrepError

FORMATS = ("jsonl", "parquet", "text", "hf_disk")
DEFAULT_GLOBS = {
    "jsonl": ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst"),
    "parquet": ("*.parquet",),
    "text": ("*.txt",),
}


def list_files(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    """`path` itself if it is a file, else the files under it matching any pattern, sorted."""
    if path.is_file():
        return [path]
    found = {p for pattern in patterns for p in path.rglob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _rel(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def _record_id(record: dict, id_field: str | None, fallback: str) -> str:
    value = record.get(id_field) if id_field else None
    return fallback if value is None else str(value)


def read_jsonl(
    file: Path, rel: str, *, text_field: str = "text", id_field: str | None = "id"
) -> Iterator[tuple[str, str]]:
    """Documents of one JSON Lines file (ids default to `<rel>:<line>`); blank lines are skipped."""
    with _open_text(file) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PrepError(f"{file}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise PrepError(
                    f"{file}:{lineno}: no {text_field!r} field (found {keys}); set "
                    f"`text_field` on this source in the mixture file"
                )
            yield _record_id(record, id_field, f"{rel}:{lineno}"), str(record[text_field])


def read_parquet(
    file: Path, rel: str, *, text_field: str = "text", id_field: str | None = "id"
) -> Iterator[tuple[str, str]]:
    """Documents from the `text_field` column of one Parquet file, in row order."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise PrepError(
            f"{file}: no column {text_field!r} (columns: {names}); set `text_field` on this "
            f"source in the mixture file"
        )
    columns = [text_field] + ([id_field] if id_field and id_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            yield (f"{rel}:{row}" if doc_id is None else str(doc_id)), text or ""
            row += 1


def read_text(file: Path, rel: str) -> Iterator[tuple[str, str]]:
    """One document per file; the id is its path relative to the source (`rel`)."""
    yield rel, file.read_text(encoding="utf-8", errors="replace")


def read_hf_disk(
    path: Path, *, text_field: str = "text", id_field: str | None = "id", split: str = "train"
) -> Iterator[tuple[str, str]]:
    """Documents from a `datasets` dataset saved with `save_to_disk` (a DatasetDict: `split`)."""
    try:
        import datasets
    except ImportError as err:
        raise PrepError(
            f"{path}: reading format 'hf_disk' needs the `datasets` package, which ettin does not "
            f"install by default: pip install datasets (or export the data to jsonl/parquet)"
        ) from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrepError(f"{path}: no split {split!r} (splits: {sorted(ds)}); set `split`")
        ds = ds[split]
    names = list(ds.column_names)
    if text_field not in names:
        raise PrepError(f"{path}: no column {text_field!r} (columns: {names}); set `text_field`")
    columns = [text_field] + ([id_field] if id_field and id_field in names else [])
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        texts = batch[text_field]
        ids = batch[id_field] if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            yield (str(row) if doc_id is None else str(doc_id)), text or ""
            row += 1


def source_files(path: str | os.PathLike, fmt: str, glob: str | None = None) -> list[Path]:
    """The files a source reads, in reading order (for `hf_disk`, the dataset folder itself)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise PrepError(f"{path}: unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not path.exists():
        raise PrepError(f"source path {path} does not exist")
    if fmt == "hf_disk":
        return [path]
    return list_files(path, (glob,) if glob else DEFAULT_GLOBS[fmt])


def read_files(
    root: str | os.PathLike,
    files: list[Path],
    fmt: str,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    split: str = "train",
) -> Iterator[tuple[str, str]]:
    """`(doc_id, text)` pairs of `files` (some of `source_files(root, ...)`), in order.

    Ids a record lacks are made of the file's path relative to `root`, so reading the files of
    a source in several parts gives the same ids as reading them in one go.
    """
    root = Path(root)
    for file in files:
        if fmt == "hf_disk":
            yield from read_hf_disk(file, text_field=text_field, id_field=id_field, split=split)
        elif fmt == "text":
            yield from read_text(file, _rel(file, root))
        else:
            read = read_jsonl if fmt == "jsonl" else read_parquet
            yield from read(file, _rel(file, root), text_field=text_field, id_field=id_field)


def read_documents(
    path: str | os.PathLike,
    fmt: str,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    glob: str | None = None,
    split: str = "train",
) -> Iterator[tuple[str, str]]:
    """`(doc_id, text)` pairs from `path` in format `fmt` (one of `FORMATS`)."""
    files = source_files(path, fmt, glob)
    return read_files(path, files, fmt, text_field=text_field, id_field=id_field, split=split)
