"""The four stages of `ettin prep`, as items any engine can hand out to tasks.

    tokenize   one item per unit (a run of one source's files)  -> token parts
    plan       one item per phase                               -> samples in order, shard cuts
    write      one item per shard of every phase and split      -> shards and their index entries
    finalize   one item per phase                               -> <out>/<phase>

Task `rank` of `world_size` does items `rank, rank + world_size, ...` of its stage (`run_task`),
each skipped when its marker says it is done, so tasks are independent, reruns resume, and the
output is the same bytes for any number of tasks, workers or machines. A stage needs the one
before it complete; its items say which are missing if not.
"""

from __future__ import annotations

from ettin.prep.job import Job, load_job

STAGES = ("tokenize", "plan", "write", "finalize")


def stage_items(job: Job, stage: str, phases: list[str] | None = None) -> list:
    """The items of `stage` (for `write`, the plan of each phase must be done)."""
    from ettin.prep.write import shard_list

    phases = job.phases if phases is None else phases
    if stage == "tokenize":
        return list(range(len(job.units)))
    if stage == "write":
        return [(p, split, k) for p in phases for split, k in shard_list(job, p)]
    if stage in ("plan", "finalize"):
        return list(phases)
    raise ValueError(f"no stage {stage!r}; stages: {STAGES}")


def run_item(job: Job, stage: str, item, cache: dict | None = None) -> object:
    """Do one item of `stage` (idempotent); `cache` keeps memory-mapped parts between items."""
    if stage == "tokenize":
        from ettin.prep.parts import tokenize_unit

        return tokenize_unit(job, item)
    if stage == "plan":
        from ettin.prep.plan import plan_phase

        return plan_phase(job, item)["stats"]
    if stage == "write":
        from ettin.prep.write import write_shard

        return write_shard(job, *item, parts={} if cache is None else cache)
    if stage == "finalize":
        from ettin.prep.write import finalize_phase

        return finalize_phase(job, item)
    raise ValueError(f"no stage {stage!r}; stages: {STAGES}")


def run_task(work: str, stage: str, rank: int, world_size: int) -> int:
    """Task `rank` of `world_size` of `stage`: its share of the items; returns how many."""
    job = load_job(work)
    items = stage_items(job, stage)[rank::world_size]
    cache: dict = {}
    for item in items:
        run_item(job, stage, item, cache)
    return len(items)
