"""The plan stage: one phase's every sample, in its final order, and where each shard ends.

From the token parts' offsets alone (no token is read), per source in the phase's `mix` order:

1. cut documents into chunks of at most C tokens (the rules of `ettin.prep.chunking`, done for
   all documents at once; backfill draws from one stream per source and phase, in document order);
2. hold out validation documents: a prefix of a permutation of the source's documents (seeded by
   the mixture's `split_seed`, so the same for every phase) holding about `val_fraction` of its
   tokens (at least one document when there are two or more);
3. sample train chunks to the budget: a source with target T and A train tokens gives floor(T / A)
   full copies of its chunks plus a seeded subset reaching the rest (no chunk twice within a
   copy); validation takes, without repeats, chunks of held-out documents up to
   `val_fraction / (1 - val_fraction)` of the train target;
4. shuffle each split with the phase seed, and cut it into shards exactly where one MDSWriter
   would (it starts a new shard when the next sample would pass `shard_size`; sizes follow its
   encoding of `input_ids: ndarray:uint32`, `source: str`, `id: str`).

Output in `<work>/plan/<phase>/`: `<split>.samples.npy` (a record per sample: source, unit, row,
start, length, chunk number, copy), `<split>.cuts.npy` (shard k is samples cuts[k]:cuts[k+1]),
`<split>.bytes.npy` (each shard's size, checked by its writer), and `plan.json` (stats.json and
meta.json but for the largest token id, which the writers find): the marker, written last.
Memory: 10 bytes per chunk (the chunk tables), 1 per document, 5 per sample planned and 4 more
per sample of the largest split (its shuffle): 20 B per chunk at 100M chunks (`bench/bench_prep.py`).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from ettin.errors import PrepError
from ettin.prep.chunking import ChunkRules
from ettin.prep.job import MDS_COLUMNS, PREP_FORMAT, Job, read_json, shard_header, write_atomic
from ettin.prep.mixture import PhaseConfig

# Purposes of the per-source random streams (each seeded by phase seed, purpose, source).
_HOLDOUT, _BACKFILL, _TRAIN, _VAL, _SHUFFLE = range(5)
SAMPLE = np.dtype(
    [("src", "u1"), ("unit", "<i4"), ("row", "<i8"), ("start", "<i4"), ("length", "<i4"),
     ("number", "<i4"), ("copy", "<i4")]
)  # fmt: skip
BLOCK = 1 << 18
"""Items gathered, sized and written per step (bounds the planner's temporaries)."""


def _rng(seed: int, purpose: int, name: str = "") -> np.random.Generator:
    return np.random.default_rng([seed, purpose, zlib.crc32(name.encode("utf-8"))])


def index_dtype(n: int) -> type:
    """The smallest signed integer type that indexes `n` items."""
    return np.int32 if n < 2**31 else np.int64


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """`rng.permutation(n)` in the smallest index type (the same order: the draws do not
    depend on the element type)."""
    out = np.arange(n, dtype=index_dtype(n))
    rng.shuffle(out)
    return out


def _first_reaching(values: np.ndarray, order: np.ndarray, want: float) -> int:
    """`np.searchsorted(np.cumsum(values[order]), want)`: the first position whose prefix sum
    reaches `want` (`len(order)` if none), summed a block at a time (no int64 array of n)."""
    acc = 0
    for b in range(0, len(order), BLOCK):
        cum = np.cumsum(values[order[b : b + BLOCK]], dtype=np.int64)
        cum += acc
        if cum[-1] >= want:
            return b + int(np.searchsorted(cum, want, side="left"))
        acc = int(cum[-1])
    return len(order)


def holdout_documents(
    doc_tokens: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of validation documents: a seeded set holding about `fraction` of tokens.

    At least one document when `fraction > 0` and there are two or more; never all of them.
    """
    n = len(doc_tokens)
    mask = np.zeros(n, bool)
    if fraction <= 0 or n < 2:
        return mask
    order = permutation(rng, n)
    want = fraction * float(doc_tokens.sum())
    k = _first_reaching(doc_tokens, order, want) + 1
    mask[order[: min(max(k, 1), n - 1)]] = True
    return mask


def sample_to_budget(
    lengths: np.ndarray, target: int | None, rng: np.random.Generator, *, repeat: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (and copy numbers) of chunks whose lengths add up to about `target`.

    `target=None` takes every chunk once. Otherwise floor(target / total) full copies (only if
    `repeat`) and the shortest prefix of a seeded permutation reaching the rest, so the total
    overshoots by less than one chunk.
    """
    n = len(lengths)
    idt = index_dtype(n)
    if target is None or n == 0:
        return np.arange(n, dtype=idt), np.zeros(n, np.uint8)
    total = int(lengths.sum(dtype=np.int64))
    copies = target // total if repeat else 0
    rest = target - copies * total
    order = permutation(rng, n)
    if rest >= total:
        take = order
    else:
        take = order[: _first_reaching(lengths, order, rest) + (rest > 0)]
    cdt = np.uint8 if copies < 255 else np.uint16 if copies < 65535 else np.uint32
    idx = np.concatenate([np.tile(np.arange(n, dtype=idt), copies), take])
    copy = np.concatenate(
        [np.repeat(np.arange(copies, dtype=cdt), n), np.full(len(take), copies, cdt)]
    )
    return idx, copy


def source_targets(phase: PhaseConfig, available: dict[str, int]) -> dict[str, int | None]:
    """Train-token target per source (None: every chunk once).

    Fixed `tokens` entries get their budget; weighted entries share what is left of the phase
    `tokens` by weight; entries with neither share it by `available` train tokens (natural
    proportions, like a uniform sample of all the data).
    """
    targets: dict[str, int | None] = {n: e.tokens for n, e in phase.mix.items()}
    if phase.tokens is None:
        return targets
    rest = phase.tokens - sum(e.tokens or 0 for e in phase.mix.values())
    shares = {
        n: (e.weight if e.weight is not None else available[n])
        for n, e in phase.mix.items()
        if e.tokens is None
    }
    total = sum(shares.values())
    for n, share in shares.items():
        targets[n] = max(1, round(rest * share / total)) if total else 1
    return targets


# --------------------------------------------------------------------------- per source


@dataclass
class SourceDocs:
    """A source's documents as the planner sees them: body lengths and id sizes, by part."""

    name: str
    lengths: np.ndarray  # body tokens per document (dropped once the chunk table is made)
    id_bytes: np.ndarray  # UTF-8 bytes of each document's id
    part_start: np.ndarray  # first document of each part (int64)
    part_unit: np.ndarray  # the unit number of each part
    documents_read: int
    documents_empty: int


def load_source(job: Job, name: str) -> SourceDocs:
    """Concatenate the offsets of a source's parts, in unit order; the stage before must be done."""
    units = [u for u, spec in enumerate(job.units) if spec["source"] == name]
    missing = [u for u in units if not job.part(u).with_suffix(".json").is_file()]
    if missing:
        raise PrepError(
            f"source {name!r}: {len(missing)} of {len(units)} token parts are not done (units "
            f"{missing[:5]}...); the tokenize stage did not finish: rerun the same command"
        )
    counts = [read_json(job.part(u).with_suffix(".json")) for u in units]
    docs = np.array([c["documents"] for c in counts], np.int64)
    total = int(docs.sum())
    longest = max((c["tokens"] for c in counts), default=0)
    lengths = np.empty(total, np.int32 if longest < 2**31 else np.int64)
    id_bytes = np.empty(total, np.int32)
    at = 0
    for u, n in zip(units, docs):
        base = job.part(u)
        # read whole: a memory map costs ~4x more per file, and there is a file per unit
        lengths[at : at + n] = np.diff(np.load(base.with_name(base.name + ".off.npy")))
        id_bytes[at : at + n] = np.diff(np.load(base.with_name(base.name + ".ido.npy")))
        at += int(n)
    if total and int(id_bytes.max()) < 2**8:
        id_bytes = id_bytes.astype(np.uint8)  # 1 byte a document instead of 4
    part_start = np.concatenate([[0], np.cumsum(docs)[:-1]]).astype(np.int64)
    read = sum(c["documents_read"] for c in counts)
    where = f"source {name!r}"
    if read == 0:
        raise PrepError(
            f"{where} has no documents; check `path`, `format` and `glob` in the mixture"
        )
    if total == 0:
        raise PrepError(f"{where}: all {read} documents are empty; check `text_field`")
    return SourceDocs(
        name, lengths, id_bytes, part_start, np.array(units, np.int32), read, read - total
    )


@dataclass
class ChunkTable:
    """A source's chunks for one phase: document, body start within it, body length."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray  # body tokens; the chunk is length + 2 with CLS and SEP
    dropped: int
    dropped_tokens: int
    backfilled: int


def chunk_table(lengths: np.ndarray, rules: ChunkRules, rng: np.random.Generator) -> ChunkTable:
    """Cut every document (of `lengths` body tokens, all > 0) as `chunking.chunk_spans` does.

    Backfill draws one integer per backfilled document, in document order, from `rng` (numpy
    draws an array of bounds element by element, so this equals one call per document).
    """
    c = rules.context_length
    step = c - 2
    n = lengths  # int32 unless a document has 2**31 tokens or more
    full = (n - 1) // step + 1
    last = n - (full - 1) * step + 2
    multi = full > 1
    drop = multi & (last < rules.min_chunk_tokens)
    kept = full - drop
    fill = multi & ~drop & (last < rules.backfill_below) if rules.backfill_below else None
    del full, multi
    total = int(kept.sum(dtype=np.int64))
    idt = index_dtype(max(len(n), total))
    first = np.zeros(len(n), idt)
    np.cumsum(kept[:-1], out=first[1:])
    doc = np.repeat(np.arange(len(n), dtype=idt), kept)
    start = np.arange(total, dtype=n.dtype if total < 2**31 else np.int64)
    start -= np.repeat(first, kept)
    start *= step  # chunk number * step: the body offset of the chunk in its document
    ldt = np.uint16 if step < 2**16 else np.uint32
    length = n[doc]
    length -= start  # the body tokens left from the chunk's start (in place: no temporaries)
    np.minimum(length, step, out=length)
    length = length.astype(ldt)
    table = ChunkTable(doc, start, length, int(drop.sum()), int(last[drop].sum()), 0)
    if fill is not None and fill.any():
        lo = rules.backfill_below - last[fill]
        r = rng.integers(lo, c - rules.backfill_below + 1)
        j = (first + kept - 1)[fill]  # each backfilled document's last chunk
        table.start[j] -= r.astype(table.start.dtype)
        table.length[j] += r.astype(ldt)
        table.length[j - 1] -= r.astype(ldt)
        table.backfilled = int(fill.sum())
    return table


# --------------------------------------------------------------------------- MDS sizes


def _digits(x: np.ndarray) -> np.ndarray:
    """Decimal digits of non-negative integers."""
    out = np.ones(len(x), np.int64)
    for k in range(1, len(str(int(x.max()))) if len(x) else 1):  # up to the largest one's
        out += x >= 10**k
    return out


def _sample_bytes(nd: np.ndarray, id_bytes: np.ndarray, src_bytes: np.ndarray) -> np.ndarray:
    """Bytes MDSWriter counts for a sample of `nd` tokens: its offset (4), the sizes of its three
    variable columns (12), the id, the ndarray (1 byte ndim/shape type, the shape, the values),
    the source."""
    shape = np.where(nd < 2**8, 1, np.where(nd < 2**16, 2, np.where(nd < 2**32, 4, 8)))
    return 16 + id_bytes + 1 + shape + 4 * nd + src_bytes


class ShardCutter:
    """MDSWriter's rule, over sample sizes fed in blocks: a new shard starts when the next
    sample would take the shard past `limit`."""

    def __init__(self, limit: int, header: int) -> None:
        self.limit, self.header = limit, header
        self.cuts: list[int] = [0]
        self.bytes: list[int] = []
        self.size = header  # of the open shard
        self.seen = 0

    def feed(self, sizes: np.ndarray) -> None:
        cum = np.cumsum(sizes, dtype=np.int64)
        pos, base = 0, 0
        while pos < len(cum):
            i = int(np.searchsorted(cum, self.limit - self.size + base, side="right"))
            if i >= len(cum):
                break
            if i == pos and self.size == self.header:
                raise PrepError(
                    f"a sample of {int(sizes[i])} bytes does not fit `shard_size` ({self.limit} "
                    f"bytes); raise `shard_size` in the mixture"
                )
            self.size += int(cum[i - 1]) - base if i > pos else 0
            self.bytes.append(self.size)
            self.cuts.append(self.seen + i)
            self.size, base, pos = self.header, int(cum[i - 1]) if i else 0, i
        self.size += int(cum[-1]) - base if len(cum) else 0
        self.seen += len(sizes)

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        if self.seen > self.cuts[-1]:
            self.bytes.append(self.size)
            self.cuts.append(self.seen)
        return np.array(self.cuts, np.int64), np.array(self.bytes, np.int64)


# --------------------------------------------------------------------------- the phase


def _write_split(
    job: Job, phase_name: str, split: str, seed: int, step: int, shard: tuple[int, int],
    sources: list[SourceDocs], tables: list[ChunkTable], picks: list[tuple[np.ndarray, np.ndarray]],
) -> int:  # fmt: skip
    """Shuffle one split's picks, size and cut them, write its plan files; return its shards.

    The split is the picks of each source one after the other, shuffled by a permutation of
    its length; each block of the permutation is resolved to (source, pick) on the fly, so
    nothing of the split's size is made but the permutation itself.
    """
    counts = np.array([len(idx) for idx, _ in picks], np.int64)
    total = int(counts.sum())
    ends = np.cumsum(counts)
    order = permutation(_rng(seed, _SHUFFLE, f"{phase_name}/{split}"), total)
    src_bytes = np.array([len(s.name.encode("utf-8")) for s in sources], np.int64)
    d = job.plan_dir(phase_name)
    tmp = d / f".{split}.samples.npy.tmp"
    header = {"descr": np.lib.format.dtype_to_descr(SAMPLE), "fortran_order": False}
    cutter = ShardCutter(*shard)
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": (total,)})
        for b in range(0, total, BLOCK):
            o = order[b : b + BLOCK]
            s = np.searchsorted(ends, o, side="right").astype(np.uint8)  # the source
            n = len(o)
            unit, row = np.empty(n, np.int32), np.empty(n, np.int64)
            start, length = np.empty(n, np.int64), np.empty(n, np.int64)
            copy, id_bytes = np.empty(n, np.int64), np.empty(n, np.int64)
            by_source = np.argsort(s, kind="stable")  # a radix sort (8-bit keys)
            bounds = np.zeros(len(picks) + 1, np.int64)
            np.cumsum(np.bincount(s, minlength=len(picks)), out=bounds[1:])
            for j, (docs, table, (idx, copies)) in enumerate(zip(sources, tables, picks)):
                m = by_source[bounds[j] : bounds[j + 1]]  # the block's samples of source j
                at = o[m] - (ends[j] - counts[j])  # the pick within source j
                c = idx[at]
                copy[m] = copies[at]
                doc = table.doc[c]
                part = np.searchsorted(docs.part_start, doc, side="right") - 1
                unit[m] = docs.part_unit[part]
                row[m] = doc - docs.part_start[part]
                start[m] = table.start[c]
                length[m] = table.length[c]
                id_bytes[m] = docs.id_bytes[doc]
            number = (start + step - 1) // step
            id_bytes += 1 + _digits(number) + np.where(copy > 0, 1 + _digits(copy), 0)
            cutter.feed(_sample_bytes(length + 2, id_bytes, src_bytes[s]))
            rec = np.empty(n, SAMPLE)
            rec["src"], rec["unit"], rec["row"], rec["start"] = s, unit, row, start
            rec["length"], rec["number"], rec["copy"] = length, number, copy
            rec.tofile(fh)
    tmp.replace(d / f"{split}.samples.npy")
    cuts, sizes = cutter.close()
    for name, values in (("cuts", cuts), ("bytes", sizes)):
        np.save(d / f"{split}.{name}.npy", values)
    return len(cuts) - 1


def _split_counts(idx: np.ndarray, docs: SourceDocs, table: ChunkTable) -> dict:
    seen = np.zeros(len(docs.id_bytes), bool)
    seen[table.doc[idx]] = True
    return {
        "documents": int(seen.sum()),
        "chunks": int(len(idx)),
        "tokens": int(table.length[idx].sum(dtype=np.int64) + 2 * len(idx)),
    }


def plan_phase(job: Job, name: str) -> dict:
    """Plan phase `name` of the job into `<work>/plan/<name>/`; return plan.json's content.

    A phase already planned is not redone.
    """
    d = job.plan_dir(name)
    if (d / "plan.json").is_file():
        return read_json(d / "plan.json")
    d.mkdir(parents=True, exist_ok=True)
    mixture = job.mixture
    phase = mixture.phases[name]
    if len(phase.mix) > 255:
        raise PrepError(f"phase {name!r} mixes {len(phase.mix)} sources; at most 255 are supported")
    rules = ChunkRules(
        context_length=phase.context_length,
        min_chunk_tokens=phase.min_chunk_tokens,
        backfill_below=phase.backfill_below,
    )
    sources = [load_source(job, s) for s in phase.mix]
    tables, held, available = [], [], {}
    for docs in sources:
        table = chunk_table(docs.lengths, rules, _rng(phase.seed, _BACKFILL, docs.name))
        seeded = _rng(mixture.split_seed, _HOLDOUT, docs.name)
        is_val = holdout_documents(docs.lengths, phase.val_fraction, seeded)
        docs.lengths = np.empty(0, docs.lengths.dtype)  # not needed any more: 4 bytes a document
        val = np.flatnonzero(is_val[table.doc]).astype(index_dtype(len(table.doc)))
        tokens = int(table.length.sum(dtype=np.int64)) + 2 * len(table.doc)
        available[docs.name] = tokens - int(table.length[val].sum(dtype=np.int64)) - 2 * len(val)
        held.append((val, int(is_val.sum()), tokens))
        tables.append(table)
        del is_val
    targets = source_targets(phase, available)
    chunk_dt = np.uint16 if phase.context_length < 2**16 else np.uint32  # chunk tokens
    picks: dict[str, list] = {"train": [], "val": []}
    source_stats = {}
    for docs, table, (val, n_val, tokens) in zip(sources, tables, held):
        n = len(table.doc)
        keep = np.ones(n, bool)
        keep[val] = False
        train = np.arange(n, dtype=index_dtype(n))[keep]  # the chunks of train documents
        del keep
        lengths = table.length[train].astype(chunk_dt, copy=False)
        lengths += 2
        target = targets[docs.name]
        idx, copy = sample_to_budget(lengths, target, _rng(phase.seed, _TRAIN, docs.name))
        del lengths
        picks["train"].append((train[idx], copy))
        del train, idx, copy
        val_target = None
        if target is not None and phase.val_fraction > 0:
            val_target = math.ceil(target * phase.val_fraction / (1 - phase.val_fraction))
        val_lengths = table.length[val].astype(chunk_dt, copy=False)
        val_lengths += 2
        vidx, vcopy = sample_to_budget(
            val_lengths, val_target, _rng(phase.seed, _VAL, docs.name), repeat=False
        )
        picks["val"].append((val[vidx], vcopy))
        source_stats[docs.name] = {
            "documents_read": docs.documents_read,
            "documents_empty": docs.documents_empty,
            "documents_val": n_val,
            "chunks": n,
            "tokens": tokens,
            "chunks_dropped_short": table.dropped,
            "tokens_dropped_short": table.dropped_tokens,
            "chunks_backfilled": table.backfilled,
            "train_tokens_available": available[docs.name],
            "train_tokens_target": target,
        }
    held.clear()
    stats: dict = {"phase": name, "context_length": phase.context_length, "seed": phase.seed}
    stats["split_seed"] = mixture.split_seed
    stats["sources"] = source_stats
    stats["splits"] = {}
    shard = shard_header(mixture)
    shards = {}
    for split in ("train", "val"):
        per_source = {
            docs.name: _split_counts(idx, docs, table)
            for (idx, _), docs, table in zip(picks[split], sources, tables)
        }
        stats["splits"][split] = {
            "chunks": sum(v["chunks"] for v in per_source.values()),
            "tokens": sum(v["tokens"] for v in per_source.values()),
            "sources": per_source,
        }
        if stats["splits"][split]["chunks"]:
            shards[split] = _write_split(
                job, name, split, phase.seed, rules.context_length - 2, shard, sources, tables,
                picks[split],
            )  # fmt: skip
        picks[split].clear()
    tok = job.spec["tokenizer"]
    meta = {
        "ettin_prep_format": PREP_FORMAT,
        "phase": name,
        "context_length": phase.context_length,
        "seed": phase.seed,
        "columns": MDS_COLUMNS,
        "compression": mixture.compression,
        "tokenizer": {"name": tok["name"], **tok["fingerprint"]},
        "split_seed": mixture.split_seed,
        "mixture": {
            "phase": asdict(phase),
            "sources": {s: asdict(mixture.sources[s]) for s in phase.mix},
        },
    }
    plan = {"stats": stats, "meta": meta, "shards": shards}
    write_atomic(d / "plan.json", json.dumps(plan, indent=1) + "\n")
    return plan
