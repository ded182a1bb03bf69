"""`ettin prep`: a mixture file -> per-phase MDS shards, deterministically.

For each phase of the mixture (`data_prep/*.yaml`):

1. read every source's documents (`readers`) and encode them with the fast tokenizer as
   `[CLS] body [SEP]`, batched, across `num_proc` processes, in input order (`encode`; done
   once per source and shared by the phases; the bodies wait in a temp file, not in memory);
2. hold out validation documents: per source, a prefix of a permutation of its documents
   (seeded by the mixture's `split_seed`, the same for every phase) holding about
   `val_fraction` of its tokens (at least one document when the source has two or more);
3. cut documents into chunks of at most C tokens (`chunking`);
4. sample train chunks to the phase budget: a source with target T and A train tokens gives
   floor(T / A) full copies of its chunks plus a seeded random subset reaching the rest
   (upsampling with replacement when short, without when long: no chunk appears more than
   once per copy); validation takes, without repeats, chunks of the held-out documents up
   to `val_fraction / (1 - val_fraction)` of the source's train target;
5. shuffle each split with the phase seed and write MDS shards with columns
   `input_ids: ndarray:uint32, source: str, id: str` to `<out>/<phase>/{train,val}/` (index.json
   records each shard's sha1 and xxh64, checked by `ettin data verify`), plus
   `stats.json` (counts) and `meta.json` (tokenizer fingerprint, C, seed, mixture).

Sample ids are `<doc_id>#<chunk number>`, with `+<copy>` appended for upsampled copies.
A phase is written into a temp folder inside `<out>` and renamed into place only when
complete, so an interrupted run leaves earlier outputs as they were. A remote `out` (s3://,
gs://, ...) is written the same way in a local temp folder, and each finished phase is uploaded
(shards, then index.json, stats.json and meta.json last: `ettin.data.remote.upload_tree`). Same inputs, tokenizer
and seeds give byte-identical files, whatever `num_proc`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ettin.errors import PrepError
from ettin.prep.chunking import ChunkRules, chunk_spans
from ettin.prep.encode import BatchEncoder
from ettin.prep.mixture import Mixture, PhaseConfig, SourceConfig, _suggest, load_mixture
from ettin.prep.readers import read_documents
from ettin.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint

MDS_COLUMNS = {"input_ids": "ndarray:uint32", "source": "str", "id": "str"}
SHARD_HASHES = ["sha1", "xxh64"]
"""Content hashes MDSWriter records per shard in index.json (`ettin data verify` checks them)."""
PREP_FORMAT = 1
SPLITS = ("train", "val")
# Purposes of the per-source random streams (each seeded by phase seed, purpose, source).
_HOLDOUT, _BACKFILL, _TRAIN, _VAL, _SHUFFLE = range(5)


def _rng(seed: int, purpose: int, name: str = "") -> np.random.Generator:
    return np.random.default_rng([seed, purpose, zlib.crc32(name.encode("utf-8"))])


# --------------------------------------------------------------------------- stage 1: tokenize


@dataclass
class TokenizedSource:
    """One source's non-empty documents, their bodies concatenated in a uint32 file."""

    name: str
    tokens_path: Path
    offsets: np.ndarray  # int64, len = documents + 1
    doc_ids: list[str]
    docs_read: int
    empty_docs: int

    def bodies(self) -> np.ndarray:
        if self.offsets[-1] == 0:
            return np.zeros(0, np.uint32)
        return np.memmap(self.tokens_path, dtype=np.uint32, mode="r")


def _source_path(name: str, src: SourceConfig) -> Path:
    if src.corpus is not None:
        from ettin.prep.corpus import corpus_path

        return corpus_path(src.corpus)
    path = Path(src.path).expanduser()
    if not path.exists():
        raise PrepError(
            f"source {name!r}: path {src.path} does not exist (relative paths are taken from "
            f"the current directory, {Path.cwd()}); fix `sources.{name}.path` in the mixture file"
        )
    return path


def _batches(
    docs: Iterable[tuple[str, str]], ids: list[str], max_docs: int = 256, max_chars: int = 1 << 20
) -> Iterator[list[str]]:
    """Group texts into batches of at most `max_docs` documents or ~`max_chars` characters."""
    batch: list[str] = []
    chars = 0
    for doc_id, text in docs:
        ids.append(doc_id)
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_source(
    name: str,
    src: SourceConfig,
    work: Path,
    encoder: BatchEncoder,
    *,
    verbose: bool = True,
) -> TokenizedSource:
    """Read and encode one source into `work/<name>.u32`; error if it has no text."""
    path = _source_path(name, src)
    docs = read_documents(
        path,
        src.format,
        text_field=src.text_field,
        id_field=src.id_field,
        glob=src.glob,
        split=src.split,
    )
    if src.max_docs is not None:
        docs = (d for _, d in zip(range(src.max_docs), docs))
    ids: list[str] = []
    kept: list[str] = []
    lengths: list[np.ndarray] = []
    tokens_path = work / f"{name}.u32"
    bar = tqdm(desc=f"tokenize {name}", unit="doc", total=src.max_docs, disable=not verbose)
    seen = 0
    with open(tokens_path, "wb") as fh:
        batches = _batches(docs, ids)
        for flat, lens in encoder.map(batches):
            batch_ids = ids[seen : seen + len(lens)]
            seen += len(lens)
            kept.extend(i for i, n in zip(batch_ids, lens) if n > 0)
            lengths.append(lens[lens > 0])
            fh.write(flat.tobytes())
            bar.update(len(lens))
    bar.close()
    where = f"source {name!r} ({path}, format {src.format})"
    if seen == 0:
        hint = f" matching glob {src.glob!r}" if src.glob else ""
        raise PrepError(
            f"{where} has no documents{hint}; check `path`, `format` and `glob` in the mixture"
        )
    if not kept:
        raise PrepError(f"{where}: all {seen} documents are empty; check `text_field`")
    lens_all = np.concatenate(lengths)
    offsets = np.zeros(len(lens_all) + 1, np.int64)
    np.cumsum(lens_all, out=offsets[1:])
    return TokenizedSource(name, tokens_path, offsets, kept, seen, seen - len(kept))


# --------------------------------------------------------------------------- stage 2: chunk


@dataclass
class Chunks:
    """A source's chunks for one phase: document, number, body start (in the file), body length."""

    doc: np.ndarray
    number: np.ndarray
    start: np.ndarray
    length: np.ndarray  # body tokens; the chunk is length + 2 with CLS and SEP
    dropped: int = 0
    dropped_tokens: int = 0
    backfilled: int = 0


def chunk_source(ts: TokenizedSource, rules: ChunkRules, seed: int, verbose: bool) -> Chunks:
    """Cut every document of `ts` with `rules` (backfill draws from a per-source seeded stream)."""
    rng = _rng(seed, _BACKFILL, ts.name)
    step = rules.context_length - 2
    doc, number, start, length = [], [], [], []
    dropped = dropped_tokens = backfilled = 0
    body_lens = np.diff(ts.offsets)
    for d in tqdm(range(len(body_lens)), desc=f"chunk {ts.name}", unit="doc", disable=not verbose):
        n = int(body_lens[d])
        spans = chunk_spans(n, rules, rng)
        full = -(-n // step)
        if len(spans) < full:
            dropped += 1
            dropped_tokens += n - (full - 1) * step + 2
        elif len(spans) > 1 and spans[-1][0] % step:
            backfilled += 1
        base = int(ts.offsets[d])
        for k, (s, e) in enumerate(spans):
            doc.append(d)
            number.append(k)
            start.append(base + s)
            length.append(e - s)
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return Chunks(
        as64(doc), as64(number), as64(start), as64(length), dropped, dropped_tokens, backfilled
    )


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
    order = rng.permutation(n)
    want = fraction * float(doc_tokens.sum())
    cum = np.cumsum(doc_tokens[order])
    k = int(np.searchsorted(cum, want, side="left")) + 1
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
    if target is None or n == 0:
        return np.arange(n, dtype=np.int64), np.zeros(n, np.int64)
    total = int(lengths.sum())
    copies = target // total if repeat else 0
    rest = target - copies * total
    order = rng.permutation(n)
    if rest >= total:
        take = order
    else:
        cum = np.cumsum(lengths[order])
        take = order[: int(np.searchsorted(cum, rest, side="left")) + (rest > 0)]
    idx = np.concatenate([np.tile(np.arange(n, dtype=np.int64), copies), take])
    copy = np.concatenate(
        [np.repeat(np.arange(copies, dtype=np.int64), n), np.full(len(take), copies)]
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


# --------------------------------------------------------------------------- stage 3: write


@dataclass
class _Selection:
    src: list[np.ndarray] = field(default_factory=list)  # source index per sample
    idx: list[np.ndarray] = field(default_factory=list)  # chunk index in that source
    copy: list[np.ndarray] = field(default_factory=list)


def _write_split(
    out: Path,
    sel: _Selection,
    sources: Sequence[TokenizedSource],
    chunks: Sequence[Chunks],
    cls_id: int,
    sep_id: int,
    seed: int,
    mixture: Mixture,
    desc: str,
    verbose: bool,
) -> int:
    """Write one split's samples in a seeded order; return the largest token id written."""
    from streaming import MDSWriter

    src = np.concatenate(sel.src)
    idx = np.concatenate(sel.idx)
    copy = np.concatenate(sel.copy)
    order = _rng(seed, _SHUFFLE, desc).permutation(len(src))
    bodies = [ts.bodies() for ts in sources]
    head, tail = np.array([cls_id], np.uint32), np.array([sep_id], np.uint32)
    top = 0
    with MDSWriter(
        out=str(out),
        columns=MDS_COLUMNS,
        compression=mixture.compression,
        hashes=SHARD_HASHES,
        size_limit=mixture.shard_size,
    ) as writer:
        for i in tqdm(order, desc=f"write {desc}", unit="chunk", disable=not verbose):
            s, c, k = int(src[i]), int(idx[i]), int(copy[i])
            ch = chunks[s]
            start, n = int(ch.start[c]), int(ch.length[c])
            sample_id = f"{sources[s].doc_ids[ch.doc[c]]}#{ch.number[c]}" + (f"+{k}" if k else "")
            ids = np.concatenate([head, bodies[s][start : start + n], tail])
            writer.write({"input_ids": ids, "source": sources[s].name, "id": sample_id})
            top = max(top, int(ids.max()))
    return top


def _split_counts(sel: _Selection, s: int, ch: Chunks) -> dict:
    idx = sel.idx[s]  # selections are appended in source order
    return {
        "documents": int(len(np.unique(ch.doc[idx]))),
        "chunks": int(len(idx)),
        "tokens": int((ch.length[idx] + 2).sum()),
    }


def build_phase(
    name: str,
    phase: PhaseConfig,
    mixture: Mixture,
    sources: dict[str, TokenizedSource],
    staged: Path,
    cls_id: int,
    sep_id: int,
    meta: dict,
    verbose: bool = True,
) -> dict:
    """Chunk, split, sample and write one phase into `staged`; return its stats."""
    rules = ChunkRules(
        context_length=phase.context_length,
        min_chunk_tokens=phase.min_chunk_tokens,
        backfill_below=phase.backfill_below,
    )
    used = [sources[n] for n in phase.mix]
    chunks = [chunk_source(ts, rules, phase.seed, verbose) for ts in used]
    pools = []
    for ts, ch in zip(used, chunks):
        seeded = _rng(mixture.split_seed, _HOLDOUT, ts.name)
        is_val = holdout_documents(np.diff(ts.offsets), phase.val_fraction, seeded)
        pools.append((is_val, np.flatnonzero(~is_val[ch.doc]), np.flatnonzero(is_val[ch.doc])))
    available = {
        ts.name: int((ch.length[train_pool] + 2).sum())
        for ts, ch, (_, train_pool, _) in zip(used, chunks, pools)
    }
    targets = source_targets(phase, available)
    train, val = _Selection(), _Selection()
    source_stats: dict[str, dict] = {}
    for s, (ts, ch, (is_val, train_pool, val_pool)) in enumerate(zip(used, chunks, pools)):
        lengths = ch.length + 2
        target = targets[ts.name]
        idx, copy = sample_to_budget(lengths[train_pool], target, _rng(phase.seed, _TRAIN, ts.name))
        train.src.append(np.full(len(idx), s, np.int64))
        train.idx.append(train_pool[idx])
        train.copy.append(copy)
        val_target = None
        if target is not None and phase.val_fraction > 0:
            val_target = math.ceil(target * phase.val_fraction / (1 - phase.val_fraction))
        vidx, vcopy = sample_to_budget(
            lengths[val_pool], val_target, _rng(phase.seed, _VAL, ts.name), repeat=False
        )
        val.src.append(np.full(len(vidx), s, np.int64))
        val.idx.append(val_pool[vidx])
        val.copy.append(vcopy)
        source_stats[ts.name] = {
            "documents_read": ts.docs_read,
            "documents_empty": ts.empty_docs,
            "documents_val": int(is_val.sum()),
            "chunks": int(len(lengths)),
            "tokens": int(lengths.sum()),
            "chunks_dropped_short": ch.dropped,
            "tokens_dropped_short": ch.dropped_tokens,
            "chunks_backfilled": ch.backfilled,
            "train_tokens_available": available[ts.name],
            "train_tokens_target": target,
        }
    stats: dict = {"phase": name, "context_length": phase.context_length, "seed": phase.seed}
    stats["split_seed"] = mixture.split_seed
    stats["sources"] = source_stats
    stats["splits"] = {}
    for split, sel in (("train", train), ("val", val)):
        per_source = {ts.name: _split_counts(sel, s, chunks[s]) for s, ts in enumerate(used)}
        stats["splits"][split] = {
            "chunks": sum(v["chunks"] for v in per_source.values()),
            "tokens": sum(v["tokens"] for v in per_source.values()),
            "sources": per_source,
        }
        if stats["splits"][split]["chunks"]:
            top = _write_split(
                staged / split, sel, used, chunks, cls_id, sep_id, phase.seed, mixture,
                f"{name}/{split}", verbose,
            )  # fmt: skip
            meta["max_token_id"] = max(meta.get("max_token_id", 0), top)
    (staged / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (staged / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return stats


# --------------------------------------------------------------------------- driver


def _swap_into_place(staged: Path, final: Path) -> None:
    """Replace `final` by `staged` with two renames; the old copy survives a crash between them."""
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        old.rename(final)  # a previous run died between the two renames below
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class PrepResult:
    """What `prep` did: stats per phase (as in stats.json) and wall times per stage."""

    out: Path | str
    """The output folder, or the URL for a remote `--out` (s3://, gs://, ...)."""
    stats: dict[str, dict]
    timings: dict[str, float]
    tokens_read: int


def summary_table(stats: dict[str, dict]) -> str:
    """One row per phase, split and source: documents, chunks, tokens, and for train the
    sampling rate (tokens written / train tokens available; above 1 means upsampled)."""
    rows = [("phase", "split", "source", "docs", "chunks", "tokens", "rate")]
    for phase, st in stats.items():
        for split, sp in st["splits"].items():
            for source, c in sp["sources"].items():
                avail = st["sources"][source]["train_tokens_available"]
                rate = f"{c['tokens'] / avail:.2f}x" if split == "train" and avail else ""
                counts = (f"{c[k]:,}" for k in ("documents", "chunks", "tokens"))
                rows.append((phase, split, source, *counts, rate))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def prep(
    mixture: Mixture | str | os.PathLike,
    out: str | os.PathLike,
    *,
    phases: Sequence[str] | None = None,
    num_proc: int = 1,
    tokenizer: str | None = None,
    verbose: bool = True,
) -> PrepResult:
    """Build `<out>/<phase>/` for the chosen `phases` (default all) of a mixture.

    `tokenizer` overrides the mixture's (`ettin`, a folder or a Hub name). Phases are swapped
    into place one at a time, each only once fully written.
    """
    where = str(mixture) if not isinstance(mixture, Mixture) else "<mixture>"
    mix = mixture if isinstance(mixture, Mixture) else load_mixture(mixture)
    chosen = list(phases) if phases else list(mix.phases)
    for p in chosen:
        if p not in mix.phases:
            raise PrepError(
                f"{where}: no phase {p!r}{_suggest(p, mix.phases)}; phases: {list(mix.phases)}"
            )
    tok_name = tokenizer or mix.tokenizer
    tok = load_tokenizer(tok_name)
    cls_id, sep_id = special_ids(tok, where=f"tokenizer {tok_name!r}")
    tokenizer_json = tok.backend_tokenizer.to_str()
    fingerprint = tokenizer_fingerprint(tok)

    from ettin.data.shards import is_remote

    remote_out = str(out).rstrip("/") if is_remote(str(out)) else None
    if remote_out:  # written locally as always, then uploaded phase by phase (ettin.data.remote)
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="ettin-prep-"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".prep-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    work = out / f".prep-{os.getpid()}.tmp"
    (work / "tokens").mkdir(parents=True)
    timings: dict[str, float] = {}
    stats: dict[str, dict] = {}
    try:
        needed = [s for s in mix.sources if any(s in mix.phases[p].mix for p in chosen)]
        tokenized: dict[str, TokenizedSource] = {}
        t0 = time.perf_counter()
        with BatchEncoder(tokenizer_json, cls_id, sep_id, num_proc) as encoder:
            for name in needed:
                tokenized[name] = tokenize_source(
                    name, mix.sources[name], work / "tokens", encoder, verbose=verbose
                )
        timings["tokenize"] = time.perf_counter() - t0
        for p in chosen:
            t0 = time.perf_counter()
            phase = mix.phases[p]
            meta = {
                "ettin_prep_format": PREP_FORMAT,
                "phase": p,
                "context_length": phase.context_length,
                "seed": phase.seed,
                "columns": MDS_COLUMNS,
                "compression": mix.compression,
                "tokenizer": {"name": tok_name, **fingerprint},
                "split_seed": mix.split_seed,
                "mixture": {
                    "phase": asdict(phase),
                    "sources": {s: asdict(mix.sources[s]) for s in phase.mix},
                },
            }
            staged = work / p
            staged.mkdir()
            stats[p] = build_phase(p, phase, mix, tokenized, staged, cls_id, sep_id, meta, verbose)
            _swap_into_place(staged, out / p)
            if remote_out:
                from ettin.data.remote import upload_tree

                upload_tree(out / p, f"{remote_out}/{p}", quiet=not verbose)
                shutil.rmtree(out / p, ignore_errors=True)
            timings[p] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if remote_out:
            shutil.rmtree(out, ignore_errors=True)
    if verbose:
        print(summary_table(stats))
    tokens_read = sum(int(ts.offsets[-1]) + 2 * len(ts.doc_ids) for ts in tokenized.values())
    return PrepResult(remote_out or out, stats, timings, tokens_read)
