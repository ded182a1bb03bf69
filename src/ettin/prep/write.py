"""The write and finalize stages: each planned shard by itself, then each phase put in place.

`write_shard` writes the samples `cuts[k]:cuts[k+1]` of a split with MDSWriter (the same columns,
compression, hashes and size limit as one MDSWriter over the whole split, so the same bytes),
checks that they made exactly one shard of the planned size, renames it `shard.{k:05}.mds[.zstd]`
and writes its index entry beside it (the marker). `finalize_phase` gathers a phase's shards
into `index.json` (as MDSWriter writes it), `stats.json` and `meta.json`, and swaps the phase
into `<out>/<phase>` (two renames; the previous copy survives a crash between them) or uploads
it (`ettin.data.remote.upload_tree`: shards first, the json files last).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ettin.errors import PrepError
from ettin.prep.job import MDS_COLUMNS, SHARD_HASHES, Job, read_json, write_atomic
from ettin.prep.parts import Part

SPLITS = ("train", "val")


def shard_list(job: Job, phase: str) -> list[tuple[str, int]]:
    """`(split, k)` of every shard the plan of `phase` holds."""
    plan = read_json(job.plan_dir(phase) / "plan.json")
    return [(split, k) for split in SPLITS for k in range(plan["shards"].get(split, 0))]


def _shard_name(k: int, compression: str | None) -> str:
    return f"shard.{k:05d}.mds" + (f".{compression.split(':')[0]}" if compression else "")


def write_shard(job: Job, phase: str, split: str, k: int, parts: dict[int, Part]) -> dict:
    """Write shard `k` of `phase/split`; return its marker (index entry and largest token id).

    `parts` caches memory-mapped token parts across the shards of one task.
    """
    from streaming import MDSWriter

    out = job.shard_dir(phase, split)
    marker = out / f"shard.{k:05d}.json"
    if marker.is_file():
        return read_json(marker)
    plan = job.plan_dir(phase)
    cuts = np.load(plan / f"{split}.cuts.npy")
    planned = int(np.load(plan / f"{split}.bytes.npy")[k])
    samples = np.load(plan / f"{split}.samples.npy", mmap_mode="r")[cuts[k] : cuts[k + 1]]
    mixture = job.mixture
    names = list(mixture.phases[phase].mix)
    tok = job.spec["tokenizer"]
    head = np.array([tok["cls_id"]], np.uint32)
    tail = np.array([tok["sep_id"]], np.uint32)
    top = 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".shard.{k:05d}.") as tmp:
        writer = MDSWriter(
            out=tmp, columns=MDS_COLUMNS, compression=mixture.compression, hashes=SHARD_HASHES,
            size_limit=mixture.shard_size,
        )  # fmt: skip
        with writer:
            for rec in samples:
                unit = int(rec["unit"])
                if unit not in parts:
                    parts[unit] = Part(job.part(unit))
                part = parts[unit]
                row = int(rec["row"])
                ids = np.concatenate(
                    [head, part.body(row, int(rec["start"]), int(rec["length"])), tail]
                )
                copy = int(rec["copy"])
                sample_id = f"{part.doc_id(row)}#{int(rec['number'])}" + (
                    f"+{copy}" if copy else ""
                )
                writer.write({"input_ids": ids, "source": names[rec["src"]], "id": sample_id})
                top = max(top, int(ids.max()))
        shards = read_json(Path(tmp) / "index.json")["shards"]
        if len(shards) != 1 or shards[0]["raw_data"]["bytes"] != planned:
            got = [s["raw_data"]["bytes"] for s in shards]
            raise RuntimeError(
                f"{phase}/{split} shard {k}: MDSWriter wrote shards of {got} bytes where the "
                f"plan has one of {planned}: the planner's size rule is out of step with MDSWriter"
            )
        info = shards[0]
        written = info["zip_data"] or info["raw_data"]
        name = _shard_name(k, mixture.compression)
        os.replace(Path(tmp) / written["basename"], out / name)
        info["raw_data"]["basename"] = f"shard.{k:05d}.mds"
        if info["zip_data"]:
            info["zip_data"]["basename"] = name
    entry = {"info": info, "max_token_id": top}
    write_atomic(marker, json.dumps(entry) + "\n")
    return entry


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


def finalize_phase(job: Job, phase: str, quiet: bool = True) -> dict:
    """Put `phase` in place at `<out>/<phase>` (or upload it); return its stats.

    A phase already finalized is not redone. The write stage must be complete.
    """
    from ettin.data.shards import is_remote

    if job.done(phase).is_file():
        return read_json(job.done(phase))
    plan = read_json(job.plan_dir(phase) / "plan.json")
    shards = shard_list(job, phase)
    missing = [
        f"{split}/{k}"
        for split, k in shards
        if not (job.shard_dir(phase, split) / f"shard.{k:05d}.json").is_file()
    ]
    if missing:
        raise PrepError(
            f"phase {phase!r}: {len(missing)} of {len(shards)} shards are not written "
            f"({', '.join(missing[:5])}...); the write stage did not finish: rerun the same command"
        )
    remote = is_remote(job.out)
    final = Path(job.out) / phase if not remote else None
    staged = job.work / "staged" / phase if remote else final.with_name(f".{phase}.staged")
    meta, files = dict(plan["meta"]), {}
    for split in SPLITS:
        entries = [
            read_json(job.shard_dir(phase, split) / f"shard.{k:05d}.json")
            for k in range(plan["shards"].get(split, 0))
        ]
        if entries:
            top = max(e["max_token_id"] for e in entries)
            meta["max_token_id"] = max(meta.get("max_token_id", 0), top)
            index = {"version": 2, "shards": [e["info"] for e in entries]}
            files[f"{split}/index.json"] = json.dumps(index, sort_keys=True)  # as MDSWriter
    files["stats.json"] = json.dumps(plan["stats"], indent=2) + "\n"
    files["meta.json"] = json.dumps(meta, indent=2) + "\n"
    in_place = final is not None and all(
        (final / rel).is_file() and (final / rel).read_text() == text for rel, text in files.items()
    )  # a previous try swapped it in and died before its marker
    if not in_place:
        for split, k in shards:
            name = _shard_name(k, meta["compression"])
            src, dst = job.shard_dir(phase, split) / name, staged / split / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_file():  # else moved by an earlier, interrupted try
                shutil.move(src, dst)
        for rel, text in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_text(text)
        if remote:
            from ettin.data.remote import upload_tree

            upload_tree(staged, f"{job.out.rstrip('/')}/{phase}", quiet=quiet)
        else:
            _swap_into_place(staged, final)
    write_atomic(job.done(phase), json.dumps(plan["stats"]) + "\n")
    shutil.rmtree(staged, ignore_errors=True)
    return plan["stats"]
