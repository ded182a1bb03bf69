"""Engines: who runs the stages' tasks (`ettin.prep.stages`). All give the same bytes.

- `local` (the default): this machine, a pool of `workers` processes handing out single items
  (each unit, shard); phase by phase after tokenizing, so each phase lands as soon as it is done.
- `datatrove`: HF's pipeline library on this machine (`LocalPipelineExecutor`: `tasks` ranks,
  `workers` at a time, its completion marks and logs in `<work>/logs/<stage>-<tasks>/`). A stage can be
  run for a subset of ranks (`local_tasks`, `local_rank_offset`): several machines sharing the
  work folder each run their ranks of a stage, then the next stage.
- `slurm`: datatrove's `SlurmPipelineExecutor`, one job array per stage, each stage depending
  on the one before (`afterok`); finished tasks are skipped when the same command is submitted
  again (datatrove's `skip_completed`), and tasks requeued by SLURM start their items clean.

datatrove is optional (`pip install -e '.[scale]'`); the tasks are plain callables, so nothing
here imports it unless its engines are used.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from tqdm.auto import tqdm

from ettin.errors import PrepError
from ettin.prep.job import Job, load_job
from ettin.prep.stages import STAGES, run_item, run_task, stage_items

ENGINES = ("local", "datatrove", "slurm")

# --------------------------------------------------------------------------- local

_JOBS: dict[str, tuple[Job, dict]] = {}


def _pool_item(work: str, stage: str, item: object) -> object:
    if work not in _JOBS:  # one job and one cache of memory-mapped parts per worker process
        _JOBS[work] = (load_job(work), {})
    job, cache = _JOBS[work]
    return run_item(job, stage, item, cache)


def _run_items(job: Job, stage: str, items: list, pool, desc: str, verbose: bool) -> list:
    bar = tqdm(total=len(items), desc=desc, unit="task", disable=not verbose)
    results = []
    if pool is None:
        cache: dict = {}
        for item in items:
            results.append(run_item(job, stage, item, cache))
            bar.update()
    else:
        futures = [pool.submit(_pool_item, str(job.work), stage, item) for item in items]
        for f in futures:
            results.append(f.result())
            bar.update()
    bar.close()
    return results


def one_core() -> None:
    """In a task process that shares this machine's cores with other tasks: the Rust
    tokenizer encodes on this one thread instead of starting a thread per core in every task
    (W tasks x cores threads on cores cores)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def run_local(job: Job, workers: int = 1, verbose: bool = True) -> dict[str, float]:
    """Every stage on this machine with `workers` processes (1: in this process)."""
    import time

    timings: dict[str, float] = {}
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(workers, get_context("spawn"), initializer=one_core)
    try:
        t0 = time.perf_counter()
        _run_items(job, "tokenize", stage_items(job, "tokenize"), pool, "tokenize", verbose)
        timings["tokenize"] = time.perf_counter() - t0
        for phase in job.phases:
            t0 = time.perf_counter()
            run_item(job, "plan", phase)
            shards = stage_items(job, "write", [phase])
            _run_items(job, "write", shards, pool, f"write {phase}", verbose)
            run_item(job, "finalize", phase)
            timings[phase] = time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return timings


# --------------------------------------------------------------------------- datatrove


@dataclass
class PrepTask:
    """A datatrove pipeline step: task `rank` of `world_size` of one stage (picklable)."""

    work: str
    stage: str
    one_core: bool = False  # True where several tasks share one machine's cores

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        if self.one_core:
            one_core()
        run_task(self.work, self.stage, rank, world_size)
        yield from data or ()

    def __repr__(self) -> str:
        return f"ettin prep: {self.stage} ({self.work})"


def _datatrove():
    try:
        import datatrove  # noqa: F401
    except ImportError as err:
        raise PrepError(
            "the datatrove and slurm engines need datatrove: pip install -e '.[scale]' "
            "(or pip install datatrove==0.9.0)"
        ) from err


def stage_tasks(job: Job, stage: str, tasks: int) -> int:
    """Ranks a stage gets: `tasks`, but no more than its items for plan and finalize (one each)."""
    return tasks if stage in ("tokenize", "write") else max(1, min(tasks, len(job.phases)))


def run_datatrove(
    job: Job,
    tasks: int,
    workers: int,
    *,
    stages: tuple[str, ...] = STAGES,
    local_tasks: int = -1,
    local_rank_offset: int = 0,
) -> None:
    """Run `stages` in order with datatrove's LocalPipelineExecutor (ranks of this machine)."""
    _datatrove()
    from datatrove.executor import LocalPipelineExecutor

    for stage in stages:
        n = stage_tasks(job, stage, tasks)
        mine = local_tasks if stage in ("tokenize", "write") else -1
        if stage not in ("tokenize", "write") and local_rank_offset:
            continue  # one machine (rank offset 0) plans and finalizes
        LocalPipelineExecutor(
            pipeline=[PrepTask(str(job.work), stage, one_core=min(workers, n) > 1)],
            tasks=n,
            workers=min(workers, n),
            logging_dir=str(job.logs(stage, n)),
            local_tasks=mine,
            local_rank_offset=local_rank_offset if mine != -1 else 0,
            start_method="spawn",
        ).run()


def run_slurm(
    job: Job,
    tasks: int,
    *,
    partition: str,
    cpus_per_task: int = 1,
    mem_per_cpu_gb: int = 2,
    time: str = "24:00:00",
    env_command: str | None = None,
    sbatch_args: dict | None = None,
) -> dict[str, str]:
    """Submit the four stages as dependent SLURM job arrays; return each stage's job id.

    The jobs run `launch_pickled_pipeline` from datatrove in the environment `env_command` sets
    up (default: activate this Python's virtualenv, if it runs in one).
    """
    _datatrove()
    from datatrove.executor import SlurmPipelineExecutor

    if env_command is None and sys.prefix != sys.base_prefix:
        env_command = f"source {os.path.join(sys.prefix, 'bin', 'activate')}"
    previous = None
    executors = {}
    for stage in STAGES:
        n = stage_tasks(job, stage, tasks)
        previous = SlurmPipelineExecutor(
            pipeline=[PrepTask(str(job.work), stage)],
            tasks=n,
            time=time,
            partition=partition,
            cpus_per_task=cpus_per_task,
            mem_per_cpu_gb=mem_per_cpu_gb,
            job_name=f"ettin-prep-{stage}",
            logging_dir=str(job.logs(stage, n)),
            env_command=env_command,
            sbatch_args=sbatch_args,
            depends=previous,
        )
        executors[stage] = previous
    previous.run()  # launches its dependencies first
    return {stage: str(ex.job_id) for stage, ex in executors.items()}
