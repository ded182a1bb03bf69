"""`ettin prep`: a mixture file -> per-phase MDS shards, deterministically, on any engine.

For each phase of the mixture (`data_prep/*.yaml`), in four stages of independent tasks
(`ettin.prep.stages`; the rules of each in `parts`, `plan` and `write`):

1. tokenize: every source's files, a unit (a run of files) per task, each document encoded as
   `[CLS] body [SEP]` with the fast tokenizer; done once per source and shared by the phases;
2. plan: cut documents into chunks of at most C tokens, hold out validation documents, sample
   train chunks to the phase budget (upsampling when short), shuffle each split with the phase
   seed and cut it into shards where one MDSWriter would;
3. write: each shard by itself, with MDSWriter, columns `input_ids: ndarray:uint32, source: str,
   id: str` (index.json records each shard's sha1 and xxh64, checked by `ettin data verify`);
4. finalize: `<out>/<phase>/{train,val}/` with index.json, `stats.json` (counts) and
   `meta.json` (tokenizer fingerprint, C, seed, mixture), swapped into place in two renames (an
   interrupted run leaves the previous copy), or uploaded for a remote `out` (s3://, gs://, ...:
   shards first, then index.json, stats.json and meta.json).

Sample ids are `<doc_id>#<chunk number>`, with `+<copy>` appended for upsampled copies. Same
inputs, tokenizer and seeds give byte-identical files whatever the engine (`ettin.prep.engines`:
local, datatrove, slurm), the number of tasks and workers, or how often a task was killed and
rerun. Everything in between lives in a work folder (`ettin.prep.job`; default `<out>/.prep-work`):
a failed or killed run leaves it, and the same command resumes from the tasks already done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ettin.errors import PrepError
from ettin.prep.job import UNIT_BYTES, create_job, read_json
from ettin.prep.mixture import Mixture

WORK = ".prep-work"
"""The default work folder, inside a local `out`."""


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
    workers: int = 1,
    tokenizer: str | None = None,
    verbose: bool = True,
    engine: str = "local",
    tasks: int | None = None,
    work: str | os.PathLike | None = None,
    keep_work: bool = False,
    unit_bytes: int = UNIT_BYTES,
    slurm: dict | None = None,
) -> PrepResult:
    """Build `<out>/<phase>/` for the chosen `phases` (default all) of a mixture.

    `tokenizer` overrides the mixture's (`ettin`, a folder or a Hub name). `engine` is `local`
    (`workers` processes), `datatrove` (`tasks` ranks, `workers` at a time) or `slurm` (`tasks`
    ranks per stage; `slurm` holds `SlurmPipelineExecutor` settings: partition, cpus_per_task,
    mem_per_cpu_gb, time, env_command, sbatch_args). With slurm this returns once the jobs are
    submitted (stats empty). The work folder is removed after a successful local or datatrove
    run unless `keep_work`.
    """
    from ettin.data.shards import is_remote
    from ettin.prep.engines import ENGINES, run_datatrove, run_local, run_slurm

    if engine not in ENGINES:
        raise PrepError(f"no engine {engine!r}; engines: {', '.join(ENGINES)}")
    remote = is_remote(str(out))
    out_s = str(out).rstrip("/") if remote else str(Path(out).resolve())
    if work is None and remote and engine == "slurm":
        raise PrepError(
            "--engine slurm with a remote --out needs --work on storage every node can read "
            "(the token parts and shards are written there before the upload)"
        )
    default_work = work is None
    if default_work:
        work = tempfile.mkdtemp(prefix="ettin-prep-") if remote else Path(out_s) / WORK
    if not remote:
        for stale in Path(out_s).glob(".prep-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run of an older ettin
    job = create_job(
        mixture, out_s, work, phases=list(phases) if phases else None, tokenizer=tokenizer,
        unit_bytes=unit_bytes, replace=default_work,
    )  # fmt: skip
    if engine == "slurm":
        ids = run_slurm(job, tasks or 1, **(slurm or {}))
        if verbose:
            print(f"submitted {', '.join(f'{s}: job {i}' for s, i in ids.items())}; work in {work}")
        return PrepResult(out_s, {}, {}, 0)
    import time

    t0 = time.perf_counter()
    if engine == "local":
        timings = run_local(job, workers, verbose)
    else:
        run_datatrove(job, tasks or workers, workers)
        timings = {"all": time.perf_counter() - t0}
    stats = {p: read_json(job.done(p)) for p in job.phases}
    parts = [read_json(job.part(u).with_suffix(".json")) for u in range(len(job.units))]
    tokens_read = sum(c["tokens"] + 2 * c["documents"] for c in parts)
    if not keep_work:
        shutil.rmtree(job.work, ignore_errors=True)
    if verbose:
        print(summary_table(stats))
    return PrepResult(out_s if remote else Path(out_s), stats, timings, tokens_read)
