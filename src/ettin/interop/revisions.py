"""Every checkpoint of a run as a Hugging Face folder named like the published revisions.

The Ettin model repos hold intermediate checkpoints as revisions (git tags) `step{N}` (phase 1,
pre-training), `ext{N}` (phase 2, context extension) and `decay{N}` (phase 3). `export_all`
writes one HF folder per checkpoint of a run (or of every run of a recipe chain) with the same
naming, plus `revisions.json`; `publish` pushes each folder as a revision (a tag, or a branch)
of a Hub repo; and `split_revision` parses `REPO@REV` (a tag or a branch) for `ettin import`.

Naming (ours, documented in README "Continue Ettin"): N is the checkpoint's batch count (the
optimizer step, Composer's `timestamp.batch`) within its phase; every phase restarts time at 0
(`init_from`: weights only), so `ext0`/`decay0` would be a phase's untrained start
(`save_step0`). The phase comes from the last folder of the run config's `data.path`
(`pretrain` -> step, `extension` -> ext, `decay` -> decay), else from the run name's suffix
(`-extension`, `-decay`; none = phase 1); a cross-objective run (`*-from-*`) is `cross{N}`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ettin.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

INDEX = "revisions.json"
PREFIX = {"pretrain": "step", "extension": "ext", "decay": "decay", "cross": "cross"}


@dataclass
class Revision:
    """One exported checkpoint: what `revisions.json` says about it."""

    revision: str
    phase: str
    batch: int
    tokens: int | None
    samples: int | None
    sha256: str
    """`ettin.checkpoint.state_digest` of the weights (sorted names, raw bytes, tie once)."""
    run: str
    objective: str
    checkpoint: str


def run_phase(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(phase, run name) of a run folder, from its config.yaml (see the module docstring)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    name, data_path = run_dir.name, ""
    config = run_dir / "config.yaml"
    if config.is_file():
        raw = OmegaConf.load(config)
        name = str(raw.get("run_name") or name)
        data_path = str((raw.get("data") or {}).get("path") or "")
    if "-from-" in name:
        return "cross", name
    last = Path(data_path.rstrip("/")).name if data_path else ""
    if last in PREFIX:
        return last, name
    for suffix, phase in (("-extension", "extension"), ("-decay", "decay")):
        if name.endswith(suffix):
            return phase, name
    return "pretrain", name


def model_name(run_name: str) -> str:
    """The model repo a run's revisions belong to: the run name without its phase suffix."""
    for suffix in ("-extension", "-decay"):
        if run_name.endswith(suffix):
            return run_name[: -len(suffix)]
    return run_name


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    from ettin.checkpoint import checkpoint_problem, run_checkpoints, sharded_checkpoints

    folder = run_dir / "checkpoints"
    found = [
        (_batch_of(p), p) for p in run_checkpoints(folder) if checkpoint_problem(p) is None
    ] + sharded_checkpoints(folder)
    return sorted(found)


def _batch_of(path: Path) -> int:
    from ettin.checkpoint import checkpoint_step

    step = checkpoint_step(path)
    assert step is not None
    return step[0]


def _timestamp(path: Path) -> dict[str, Any]:
    if path.is_dir():  # sharded: the name says the batch; tokens are not read
        return {}
    from ettin.checkpoint import read_composer_checkpoint_meta

    stamp = read_composer_checkpoint_meta(path).get("timestamp") or {}
    return dict(stamp.get("Timestamp", stamp)) if isinstance(stamp, dict) else {}


def export_all(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | None = None
) -> list[Revision]:
    """Export every complete checkpoint of `run_dir` to `out_dir/<revision>/`; write the index.

    An existing `revisions.json` in `out_dir` is merged (a recipe chain's phases share one
    model folder); a revision already exported with the same weights digest is not rewritten.
    """
    from ettin.checkpoint import load_weights, state_digest
    from ettin.interop import export_hf, read_any_checkpoint
    from ettin.model import EttinModel

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoints = _checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(
            f"no complete checkpoint in {run_dir / 'checkpoints'}: train the run first "
            "(or point at a run folder, not its checkpoints/ folder)"
        )
    phase, run = run_phase(run_dir)
    index = read_index(out_dir)
    done: list[Revision] = []
    for batch, path in checkpoints:
        name = f"{PREFIX[phase]}{batch}"
        state, info = read_any_checkpoint(path)  # a reference run's too
        digest = state_digest(state)
        stamp = _timestamp(path)
        rev = Revision(
            revision=name,
            phase=phase,
            batch=batch,
            tokens=stamp.get("token"),
            samples=stamp.get("sample"),
            sha256=digest,
            run=run,
            objective=info.objective,
            checkpoint=str(path),
        )
        old = index.get(name)
        if old and old.get("run") != run:
            raise UsageError(
                f"{out_dir}: revision {name} already comes from run {old['run']}, not {run}; "
                "export each model (encoder, decoder, cross) into its own folder"
            )
        if not (old and old.get("sha256") == digest and (out_dir / name / "config.json").exists()):
            model = EttinModel(info.model_args)
            load_weights(model, state, source=str(path))
            export_hf(
                model,
                out_dir / name,
                tokenizer=tokenizer or info.tokenizer.get("path"),
                max_seq_len=info.max_seq_len,
                base_config=info.hf_config,
                objectives=info.lineage.get("objectives"),
            )
        index[name] = asdict(rev)
        done.append(rev)
    write_index(out_dir, index)
    return done


def export_runs(
    runs: list[tuple[str, Path]], out_dir: str | os.PathLike, *, tokenizer: str | None = None
) -> dict[str, list[Revision]]:
    """`export_all` for each (run name, run folder), e.g. a recipe's stages: `out_dir/<model>/`.

    A model is a run family (`encoder-17m` with its `-extension` and `-decay` stages); each
    cross-objective run is its own model. Runs without checkpoints are skipped (logged).
    """
    out: dict[str, list[Revision]] = {}
    for run_name, run_dir in runs:
        if not _checkpoints(run_dir):
            log.warning("%s: no checkpoint yet, skipped", run_dir)
            continue
        model = model_name(run_name)
        out.setdefault(model, []).extend(
            export_all(run_dir, Path(out_dir) / model, tokenizer=tokenizer)
        )
    if not out:
        names = ", ".join(name for name, _ in runs)
        raise CheckpointError(f"none of the runs {names} has a checkpoint under its run folder")
    return out


def read_index(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    path = Path(out_dir) / INDEX
    return json.loads(path.read_text())["revisions"] if path.is_file() else {}


def write_index(out_dir: str | os.PathLike, index: dict[str, dict[str, Any]]) -> Path:
    """`revisions.json`: {"revisions": {rev: {phase, batch, tokens, sha256, ...}}} in order."""

    def key(item):
        rev = item[1]
        order = list(PREFIX).index(rev["phase"]) if rev["phase"] in PREFIX else len(PREFIX)
        return order, rev["batch"]

    path = Path(out_dir) / INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(index.items(), key=key))
    path.write_text(json.dumps({"revisions": ordered}, indent=2) + "\n")
    return path


def publish(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    main: str | None = None,
    tags: bool = True,
    token: str | None = None,
    api: Any = None,
) -> list[str]:
    """Push every revision folder of `out_dir` to `repo_id` as a git tag (or branch) of that name.

    `tags=True` (the default, as the Ettin release publishes its revisions): each folder is
    uploaded to `main` as one commit holding exactly that folder (`delete_patterns="*"`), and
    that commit is tagged with the revision's name (`create_tag(revision=<commit>)`), in index
    order (phase, then batch), so `main` ends at the last revision. `tags=False`: a branch per
    revision (`create_branch` + `upload_folder(revision=<rev>)`). Then `revisions.json` goes to
    `main`, and so does the folder named by `main` (e.g. the final `decay…`), if given. Returns
    the revisions pushed. `REPO@<tag>` and `--revision <tag>` load a tag like a branch.
    """
    out_dir = Path(out_dir)
    index = read_index(out_dir)
    if not index:
        raise UsageError(
            f"{out_dir / INDEX} not found: run `ettin export --all RUN_DIR {out_dir}` first"
        )
    missing = [r for r in index if not (out_dir / r / "config.json").is_file()]
    if missing:
        raise UsageError(f"{out_dir}: revisions {missing[:5]} listed in {INDEX} are not there")
    if main is not None and main not in index:
        raise UsageError(f"--main {main} is not one of the revisions in {out_dir / INDEX}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    pushed = []
    for rev, meta in index.items():
        message = f"{rev}: {meta['phase']} batch {meta['batch']}, {meta.get('tokens')} tokens"
        if tags:
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(out_dir / rev),
                repo_type="model",
                commit_message=message,
                delete_patterns="*",  # the tagged commit holds this revision's files only
            )
            oid = getattr(commit, "oid", None)
            if not oid:
                raise RuntimeError(f"{repo_id}: the upload of {rev} returned no commit to tag")
            api.create_tag(
                repo_id=repo_id, tag=rev, revision=oid, repo_type="model", tag_message=message
            )
        else:
            api.create_branch(repo_id=repo_id, branch=rev, repo_type="model", exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(out_dir / rev),
                revision=rev,
                repo_type="model",
                commit_message=message,
            )
        pushed.append(rev)
    if main is not None:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out_dir / main),
            repo_type="model",
            commit_message=f"main = {main}",
            **({"delete_patterns": "*"} if tags else {}),
        )
    api.upload_file(
        path_or_fileobj=str(out_dir / INDEX),
        path_in_repo=INDEX,
        repo_id=repo_id,
        repo_type="model",
        commit_message="index of the revisions",
    )
    return pushed


def split_revision(source: str, revision: str | None = None) -> tuple[str, str | None]:
    """`REPO@REV` -> (REPO, REV); an existing path is never split; `revision` must agree."""
    if "@" not in source or Path(source).exists():
        repo, rev = source, revision
    else:
        repo, _, rev = source.rpartition("@")
        if not repo or not rev:
            raise UsageError(
                f"{source!r}: write REPO@REVISION (a tag or branch), e.g. "
                "jhu-clsp/ettin-encoder-17m@step0"
            )
        if revision is not None and revision != rev:
            raise UsageError(f"{source!r} names revision {rev!r} but --revision says {revision!r}")
    if rev is not None and Path(repo).is_dir():
        raise UsageError(
            f"{repo} is a local folder: transformers ignores a revision ({rev}) for local folders "
            f"and would load what is checked out; run `git -C {repo} checkout {rev}` and import "
            "the folder without @"
        )
    return repo, rev
