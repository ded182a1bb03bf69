"""The prep job: what every task needs, in one work folder that every machine can read.

`ettin prep` is four stages of independent tasks (`ettin.prep.stages`); any engine runs them
(`ettin.prep.engines`: a local process pool, datatrove locally, datatrove on SLURM). The driver
validates everything first (`create_job`: the mixture, the phases, the tokenizer, each source's
files) and writes the job into the work folder; tasks read only the work folder:

    <work>/job.json                  the validated mixture, phases, output, tokenizer ids, units
    <work>/tokenizer.json            the fast tokenizer's backend (tasks encode with it)
    <work>/parts/<unit>.*            tokenize: one token part per unit (a run of a source's files)
    <work>/plan/<phase>/             plan: every sample of each split in its final order, the cuts
    <work>/shards/<phase>/<split>/   write: shard.NNNNN.mds[.zstd] and its index entry (.json)
    <work>/done/<phase>.json         finalize: the phase is in place at `<out>/<phase>`
    <work>/logs/<stage>-<tasks>/     datatrove's logs and completion marks (per task count)

Every output is written under a temp name and renamed, and its marker (`.json`) comes last, so a
task killed at any point leaves nothing that is taken for done and its rerun starts clean.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ettin.errors import PrepError
from ettin.prep.mixture import Mixture, SourceConfig, _suggest, load_mixture, parse_mixture

MDS_COLUMNS = {"input_ids": "ndarray:uint32", "source": "str", "id": "str"}
SHARD_HASHES = ["sha1", "xxh64"]
"""Content hashes MDSWriter records per shard in index.json (`ettin data verify` checks them)."""
PREP_FORMAT = 1
"""Version of the prepared layout, in meta.json."""
JOB_FORMAT = 1
"""Version of the work folder's layout, in job.json (a work folder of another version is refused)."""
UNIT_BYTES = 8 << 20
"""A tokenize unit closes once its files reach this many bytes (a larger file is a unit alone)."""


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temp name, so a reader sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _source_root(name: str, src: SourceConfig) -> Path:
    if src.corpus is not None:
        from ettin.prep.corpus import corpus_path

        return corpus_path(src.corpus)
    path = Path(src.path).expanduser().resolve()
    if not path.exists():
        raise PrepError(
            f"source {name!r}: path {src.path} does not exist (relative paths are taken from "
            f"the current directory, {Path.cwd()}); fix `sources.{name}.path` in the mixture file"
        )
    return path


def _units(name: str, src: SourceConfig, unit_bytes: int) -> list[dict]:
    """A source's files in reading order, grouped into units of about `unit_bytes`.

    A source read with `max_docs` (a prefix in reading order) or from `hf_disk` is one unit.
    """
    from ettin.prep.readers import source_files

    root = _source_root(name, src)
    files = source_files(root, src.format, src.glob)
    if not files:
        hint = f" matching glob {src.glob!r}" if src.glob else ""
        raise PrepError(
            f"source {name!r} ({root}, format {src.format}) has no documents{hint}; check "
            f"`path`, `format` and `glob` in the mixture"
        )
    stamped = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if src.max_docs is not None or src.format == "hf_disk":
        return [{"source": name, "root": str(root), "files": stamped}]
    units: list[dict] = []
    group: list[list] = []
    size = 0
    for entry in stamped:
        group.append(entry)
        size += entry[1]
        if size >= unit_bytes:
            units.append({"source": name, "root": str(root), "files": group})
            group, size = [], 0
    if group:
        units.append({"source": name, "root": str(root), "files": group})
    return units


def shard_header(mixture: Mixture) -> tuple[int, int]:
    """(size limit, bytes of an empty shard) as MDSWriter computes them, from MDSWriter itself."""
    import tempfile

    from streaming import MDSWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = MDSWriter(
            out=tmp, columns=MDS_COLUMNS, compression=mixture.compression, hashes=SHARD_HASHES,
            size_limit=mixture.shard_size,
        )  # fmt: skip
        limit, header = int(writer.size_limit), int(writer.extra_bytes_per_shard)
        writer.finish()
    return limit, header


def _check_shard_size(mix: Mixture, phases: list[str], where: str) -> None:
    """Every shard must hold at least one chunk of C tokens (MDSWriter would write empty ones)."""
    limit, header = shard_header(mix)
    for p in phases:
        c = mix.phases[p].context_length
        need = header + 4 * c + 128  # a shard's header, the tokens, room for id and source
        if limit < need:
            raise PrepError(
                f"{where}: `shard_size: {mix.shard_size}` cannot hold one chunk of phase {p!r} "
                f"(context_length {c} needs at least {need} bytes); raise `shard_size`"
            )


@dataclass
class Job:
    """A validated prep job, as its tasks read it from `<work>/job.json`."""

    work: Path
    spec: dict

    @property
    def mixture(self) -> Mixture:
        return parse_mixture(self.spec["mixture"], f"{self.work}/job.json")

    @property
    def phases(self) -> list[str]:
        return list(self.spec["phases"])

    @property
    def units(self) -> list[dict]:
        return self.spec["units"]

    @property
    def out(self) -> str:
        return self.spec["out"]

    def tokenizer_json(self) -> str:
        return (self.work / "tokenizer.json").read_text()

    # paths (one place for the layout in the module docstring)
    def part(self, unit: int) -> Path:
        return self.work / "parts" / f"{unit:06d}"

    def plan_dir(self, phase: str) -> Path:
        return self.work / "plan" / phase

    def shard_dir(self, phase: str, split: str) -> Path:
        return self.work / "shards" / phase / split

    def done(self, phase: str) -> Path:
        return self.work / "done" / f"{phase}.json"

    def logs(self, stage: str, tasks: int) -> Path:
        """datatrove's logging folder (its completion marks hold for this many tasks only)."""
        return self.work / "logs" / f"{stage}-{tasks}"


def load_job(work: str | os.PathLike) -> Job:
    """The job a driver wrote into `work` (tasks call this; it checks nothing is missing)."""
    work = Path(work)
    path = work / "job.json"
    if not path.is_file():
        raise PrepError(
            f"{work} holds no prep job (no job.json); run `ettin prep ... --work {work}`"
        )
    spec = read_json(path)
    if spec.get("job_format") != JOB_FORMAT:
        raise PrepError(
            f"{path} is a work folder of another ettin version (job_format "
            f"{spec.get('job_format')}, this one writes {JOB_FORMAT}); delete it and rerun"
        )
    return Job(work, spec)


def create_job(
    mixture: Mixture | str | os.PathLike,
    out: str | os.PathLike,
    work: str | os.PathLike,
    *,
    phases: list[str] | None = None,
    tokenizer: str | None = None,
    unit_bytes: int = UNIT_BYTES,
    replace: bool = False,
) -> Job:
    """Validate a prep and write it into `work`; everything wrong fails here, before any task.

    A work folder that already holds this very job is kept (its finished tasks are not redone:
    a rerun resumes). One that holds another job is cleared when `replace` (the default work
    folder inside `out` belongs to prep), and refused otherwise.
    """
    from ettin.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint

    where = str(mixture) if not isinstance(mixture, Mixture) else "<mixture>"
    mix = mixture if isinstance(mixture, Mixture) else load_mixture(mixture)
    chosen = list(phases) if phases else list(mix.phases)
    for p in chosen:
        if p not in mix.phases:
            raise PrepError(
                f"{where}: no phase {p!r}{_suggest(p, mix.phases)}; phases: {list(mix.phases)}"
            )
    _check_shard_size(mix, chosen, where)
    tok_name = tokenizer or mix.tokenizer
    tok = load_tokenizer(tok_name)
    cls_id, sep_id = special_ids(tok, where=f"tokenizer {tok_name!r}")
    needed = [s for s in mix.sources if any(s in mix.phases[p].mix for p in chosen)]
    units = [u for s in needed for u in _units(s, mix.sources[s], unit_bytes)]
    spec = {
        "job_format": JOB_FORMAT,
        "mixture": asdict(mix),
        "phases": chosen,
        "out": str(out),
        "tokenizer": {
            "name": tok_name,
            "cls_id": cls_id,
            "sep_id": sep_id,
            "fingerprint": tokenizer_fingerprint(tok),
        },
        "units": units,
    }
    work = Path(work)
    path = work / "job.json"
    if path.is_file():
        old = read_json(path)
        if old == spec:
            return Job(work, spec)
        if not replace:
            differs = next((k for k in spec if old.get(k) != spec[k]), "job_format")
            raise PrepError(
                f"work folder {work} holds another prep job (its {differs!r} differs); use "
                f"another --work, or delete {work} to start this one"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(work / "tokenizer.json", tok.backend_tokenizer.to_str())
    write_atomic(path, json.dumps(spec, indent=1) + "\n")
    return Job(work, spec)
