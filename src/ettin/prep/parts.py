"""Token parts: the tokenize stage's output, one per unit (a run of one source's files).

A part holds the non-empty documents of its files, encoded as `[CLS] body [SEP]` and stored
without CLS and SEP (chunking adds them back):

    <unit>.tok      the bodies, uint32, concatenated
    <unit>.off.npy  int64 offsets of each body in .tok (documents + 1)
    <unit>.ids      the document ids, UTF-8, concatenated
    <unit>.ido.npy  int64 offsets of each id in .ids (documents + 1)
    <unit>.json     counts (documents read, empty, kept, tokens): written last, the part's marker

The planner reads only the offsets; the shard writers memory-map the rest. A source's parts,
concatenated in unit order, are exactly the documents one reader would give in one pass.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from ettin.prep.job import Job, read_json, write_atomic

_ENCODERS: dict[Path, object] = {}


def _encoder(job: Job):
    """One encoder per process and job (building the Rust tokenizer takes a moment)."""
    from ettin.prep.encode import BodyEncoder

    if job.work not in _ENCODERS:
        tok = job.spec["tokenizer"]
        _ENCODERS[job.work] = BodyEncoder(job.tokenizer_json(), tok["cls_id"], tok["sep_id"])
    return _ENCODERS[job.work]


def _batches(
    docs: Iterable[tuple[str, str]], max_docs: int = 256, max_chars: int = 1 << 14
) -> Iterator[tuple[list[str], list[str]]]:
    """`(ids, texts)` of at most `max_docs` documents or about `max_chars` characters.

    Small batches keep the encoder's working set (every Encoding of the batch) in cache: with
    two tasks on two cores, 16k-character batches scaled 1.83-2.04x and 1M-character ones
    1.69-1.78x (bench/bench_prep.py); alone, a task is as fast with either. The batch size
    changes no byte of the output (each document is encoded on its own)."""
    ids: list[str] = []
    texts: list[str] = []
    chars = 0
    for doc_id, text in docs:
        ids.append(doc_id)
        texts.append(text)
        chars += len(text)
        if len(texts) >= max_docs or chars >= max_chars:
            yield ids, texts
            ids, texts, chars = [], [], 0
    if texts:
        yield ids, texts


def tokenize_unit(job: Job, unit: int) -> dict:
    """Read and encode the files of `unit` into its part; return its counts (the marker).

    A part already marked done is not redone.
    """
    from ettin.prep.readers import read_files

    base = job.part(unit)
    marker = base.with_suffix(".json")
    if marker.is_file():
        return read_json(marker)
    spec = job.units[unit]
    src = job.mixture.sources[spec["source"]]
    files = [Path(f) for f, *_ in spec["files"]]
    docs = read_files(
        spec["root"], files, src.format, text_field=src.text_field, id_field=src.id_field,
        split=src.split,
    )  # fmt: skip
    if src.max_docs is not None:
        docs = islice(docs, src.max_docs)
    encoder = _encoder(job)
    base.parent.mkdir(parents=True, exist_ok=True)
    for stale in base.parent.glob(f".{base.name}.*.tmp"):
        stale.unlink()  # left by a killed try of this task
    tmp = {ext: base.with_name(f".{base.name}{ext}.{os.getpid()}.tmp") for ext in (".tok", ".ids")}
    lengths: list[np.ndarray] = []
    id_lengths: list[int] = []
    read = 0
    with open(tmp[".tok"], "wb") as tok_fh, open(tmp[".ids"], "wb") as ids_fh:
        for ids, texts in _batches(docs):
            flat, lens = encoder(texts)
            read += len(lens)
            tok_fh.write(flat.tobytes())
            for doc_id, n in zip(ids, lens):
                if n > 0:
                    raw = doc_id.encode("utf-8")
                    ids_fh.write(raw)
                    id_lengths.append(len(raw))
            lengths.append(lens[lens > 0])
    lens_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    for name, values in ((".off.npy", lens_all), (".ido.npy", np.asarray(id_lengths, np.int64))):
        offsets = np.zeros(len(values) + 1, np.int64)
        np.cumsum(values, out=offsets[1:])
        buf = io.BytesIO()
        np.save(buf, offsets)
        write_atomic(base.with_name(base.name + name), buf.getvalue())
    for ext, path in tmp.items():
        os.replace(path, base.with_name(base.name + ext))
    counts = {
        "source": spec["source"],
        "documents_read": read,
        "documents_empty": read - len(lens_all),
        "documents": len(lens_all),
        "tokens": int(lens_all.sum()),
    }
    write_atomic(marker, json.dumps(counts) + "\n")
    return counts


class Part:
    """One part, memory-mapped for the shard writers."""

    def __init__(self, base: Path) -> None:
        self.offsets = np.load(base.with_name(base.name + ".off.npy"), mmap_mode="r")
        self.id_offsets = np.load(base.with_name(base.name + ".ido.npy"), mmap_mode="r")
        tok, ids = base.with_name(base.name + ".tok"), base.with_name(base.name + ".ids")
        self.tokens = (
            np.memmap(tok, np.uint32, "r") if tok.stat().st_size else np.zeros(0, np.uint32)
        )
        self.ids = np.memmap(ids, np.uint8, "r") if ids.stat().st_size else np.zeros(0, np.uint8)

    def body(self, row: int, start: int, length: int) -> np.ndarray:
        at = int(self.offsets[row]) + start
        return self.tokens[at : at + length]

    def doc_id(self, row: int) -> str:
        return (
            self.ids[int(self.id_offsets[row]) : int(self.id_offsets[row + 1])].tobytes().decode()
        )
