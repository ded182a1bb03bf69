"""Model weights in and out of checkpoints: Composer run checkpoints and plain ettin files.

A Composer checkpoint (`runs/<run>/checkpoints/*.pt`) holds the full training state; the
`RunInfo` callback stores beside it what is needed to rebuild the model without the config
(model args, objective, tokenizer). An ettin file (`ettin import` output) holds the same
metadata and a bare state dict. Both load into an `EttinModel` with `load_checkpoint`. This
module knows no foreign format: a Composer checkpoint without ettin's metadata (the reference
training's) is refused with a message naming `ettin.interop.formats.read_any_checkpoint`, the
reader of every format, which callers that accept foreign checkpoints import explicitly.

Crash safety (`prepare_resume`). Composer writes `ep{e}-ba{b}-rank{r}.pt` in place and then
repoints the `latest-rank{r}.pt` symlink, so a kill or a full disk can leave a partial file (which
Composer's autoresume then refuses as "may conflict with a future checkpoint") or a missing or
stale `latest`. Before the Trainer is built, rank 0 checks every checkpoint file of the run
(a torch zip whose central directory is intact, and the newest one unpickled), moves partial or
unreadable ones into `checkpoints/incomplete/`, and points `latest-rank0.pt` at the newest
complete checkpoint by its step (never by file-name order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback

from ettin.errors import CheckpointError
from ettin.model import EttinModel, ModelArgs

log = logging.getLogger(__name__)

ETTIN_FORMAT = 1
CHECKPOINT_FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
"""Composer `save_filename` of a run's checkpoints (the step is in the name: `checkpoint_step`)."""
LATEST_FILENAME = "latest-rank{rank}.pt"
"""Composer `save_latest_filename`: a symlink to the newest checkpoint, which autoresume loads."""
INCOMPLETE = "incomplete"
"""Sub-folder of the checkpoint folder where partial or unreadable checkpoint files are moved."""
_CHECKPOINT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")


@dataclass
class CheckpointInfo:
    """What a checkpoint says about the model it holds."""

    model_args: ModelArgs
    objective: str
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """The tokenizer's fingerprint (ids of special tokens, vocab size) and its directory, if known."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """Where the run's starting weights came from: `init_from` and `init_digest` (see `state_digest`)."""
    max_seq_len: int | None = None
    """The sequence length the model was trained at (`data.max_seq_len`); the HF export records it."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """An imported model's config.json as written; `ettin export` keeps the fields ettin does not model."""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a model state dict (sorted names, raw bytes; the tied decoder weight skipped)."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key == "decoder.weight":
            continue
        tensor = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_ettin_checkpoint(path: str | os.PathLike, model: EttinModel, info: CheckpointInfo) -> Path:
    """Write a plain ettin checkpoint (weights + metadata) that `init_from` and `ettin export` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "ettin_format": ETTIN_FORMAT,
        "model_args": dataclasses.asdict(info.model_args),
        "objective": info.objective,
        "tokenizer": info.tokenizer,
        "lineage": info.lineage,
        "max_seq_len": info.max_seq_len,
        "hf_config": info.hf_config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)
    return path


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Composer wraps the model as `.model`; torch.compile adds `_orig_mod.`."""
    out = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if (
            key.startswith("model.model.")
            or key.startswith("model.head.")
            or key.startswith("model.decoder.")
        ):
            key = key[len("model.") :]
        out[key] = value
    return out


def checkpoint_step(path: str | os.PathLike) -> tuple[int, int] | None:
    """(batch, rank) of a run checkpoint named `ep{e}-ba{b}-rank{r}.pt`, else None."""
    m = _CHECKPOINT_RE.match(Path(path).name)
    return (int(m.group(2)), int(m.group(3))) if m else None


def run_checkpoints(folder: str | os.PathLike, rank: int = 0) -> list[Path]:
    """This rank's checkpoint files in `folder`, oldest first by step (not by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        step = checkpoint_step(p)
        if step is not None and step[1] == rank and p.is_file() and not p.is_symlink():
            found.append((step[0], p))
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete torch checkpoint file (None when it is).

    torch.save writes a zip whose central directory comes last, so a file cut short by a kill
    or a full disk has none (or one that points past the end of the file). Cheap: the tensor
    data is not read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not any(i.filename.endswith("data.pkl") for i in infos):
                return "no data.pkl record"
            for info in infos:
                if info.header_offset + info.compress_size > size:
                    return f"record {info.filename} runs past the end of the file"
    except zipfile.BadZipFile as err:
        return f"not a complete torch file ({err})"
    except OSError as err:
        return f"cannot be read ({err})"
    return None


def read_composer_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `state` of a Composer checkpoint with tensors memory-mapped (cheap for large files)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not (isinstance(payload, dict) and isinstance(payload.get("state"), dict)):
        raise CheckpointError(f"{path} is not a Composer checkpoint")
    return payload["state"]


_SHARDED_RE = re.compile(r"^ep(\d+)-ba(\d+)$")


def sharded_checkpoints(folder: Path, moved: list[Path] | None = None) -> list[tuple[int, Path]]:
    """(batch, folder) of the complete FSDP sharded checkpoints in `folder`, oldest first.

    Composer saves a sharded checkpoint as torch.distributed.checkpoint files in `ep{e}-ba{b}/`;
    its `.metadata` is written last (after every rank's shard), so a folder without one is
    partial: it is moved into `incomplete/` (and listed in `moved`) when `moved` is given.
    """
    found = []
    if not folder.is_dir():
        return found
    for p in folder.iterdir():
        m = _SHARDED_RE.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        if (p / ".metadata").is_file():
            found.append((int(m.group(2)), p))
        elif moved is not None:
            moved.append(_move_aside(p, "sharded checkpoint without .metadata"))
    return sorted(found)


@dataclass
class ResumePoint:
    """What `prepare_resume` found in a run's checkpoint folder."""

    checkpoint: Path | None
    """The newest complete checkpoint (what `latest-rank0.pt` now points at), or None."""
    timestamp: dict[str, Any] = field(default_factory=dict)
    """Its Composer timestamp (`batch`, `sample`, `token`, `epoch`, ...)."""
    moved: list[Path] = field(default_factory=list)
    """Partial or unreadable files moved into `incomplete/` (their new paths)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """The `ModelArgs` fields its `RunInfo` recorded (empty for a sharded checkpoint)."""

    @property
    def batch(self) -> int:
        return int(self.timestamp.get("batch", 0))


def _move_aside(path: Path, reason: str) -> Path:
    dest_dir = path.parent / INCOMPLETE
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / path.name
    n = 1
    while dest.exists():
        dest = dest_dir / f"{path.name}.{n}"
        n += 1
    path.replace(dest)
    log.warning("checkpoint %s is incomplete (%s): moved to %s", path, reason, dest)
    return dest


def _point_latest(folder: Path, target: Path | None, rank: int = 0) -> None:
    """Make `latest-rank{rank}.pt` a relative symlink to `target` (atomically), or remove it."""
    latest = folder / LATEST_FILENAME.format(rank=rank)
    if target is None:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        return
    rel = os.path.relpath(target, folder)
    if latest.is_symlink() and os.readlink(latest) == rel:
        return
    tmp = folder / f".{latest.name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, latest)


def prepare_resume(folder: str | os.PathLike, rank: int = 0) -> ResumePoint:
    """Make a run's checkpoint folder safe to autoresume from; call on one process only.

    Every `ep*-ba*-rank{rank}.pt` file is checked (`checkpoint_problem`), and the newest
    structurally complete one is also unpickled; partial or unreadable files are moved into
    `<folder>/incomplete/` (logged), and `latest-rank{rank}.pt` is pointed at the newest
    complete checkpoint by step (removed when there is none). Returns what it found.
    """
    folder = Path(folder)
    point = ResumePoint(checkpoint=None)
    candidates = run_checkpoints(folder, rank)
    good: list[Path] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem:
            point.moved.append(_move_aside(path, problem))
        else:
            good.append(path)
    while good:
        newest = good[-1]
        try:
            state = read_composer_checkpoint_meta(newest)
            stamp = state.get("timestamp") or {}
            stamp = stamp.get("Timestamp", stamp) if isinstance(stamp, dict) else {}
            point.timestamp = dict(stamp)
            point.checkpoint = newest
            run_info = (state.get("callbacks") or {}).get("RunInfo") or {}
            point.model_args = dict(run_info.get("model_args") or {})
            break
        except CheckpointError as err:
            point.moved.append(_move_aside(newest, str(err)))
            good.pop()
    for batch, path in sharded_checkpoints(folder, point.moved):
        if point.checkpoint is None or batch > point.batch:
            point.checkpoint, point.timestamp, point.model_args = path, {"batch": batch}, {}
    if folder.is_dir():
        _point_latest(folder, point.checkpoint, rank)
    if point.checkpoint is not None:
        log.info(
            "autoresume: newest complete checkpoint is %s (batch %d)", point.checkpoint, point.batch
        )
    return point


def _read_sharded(path: Path) -> dict[str, Any]:
    """Model weights and callback state of an FSDP sharded checkpoint folder, on one process.

    torch.distributed.checkpoint reads the shards of every rank and returns full tensors; the
    optimiser state is not read.
    """
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": reading on one process is intended
        return _load_state_dict_from_keys({"state.model", "state.callbacks"}, checkpoint_id=path)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file (or sharded folder) that `path` names.

    For a folder: its `latest-rank0.pt`, else its newest complete run checkpoint by step, else
    its only `*.pt` file.
    """
    path = Path(path)
    if path.is_dir() and not (path / ".metadata").is_file():  # not a sharded one
        latest = path / LATEST_FILENAME.format(rank=0)
        complete = [p for p in run_checkpoints(path) if checkpoint_problem(p) is None]
        others = sorted(p for p in path.glob("*.pt") if checkpoint_step(p) is None and p != latest)
        if latest.exists():
            path = latest.resolve()
        elif complete:
            path = complete[-1]
        elif len(others) == 1:
            path = others[0]
        elif others:
            raise CheckpointError(
                f"{path} holds several checkpoints ({', '.join(p.name for p in others)}) and no "
                f"latest-rank0.pt; name the file to use"
            )
        elif run_checkpoints(path):
            raise CheckpointError(
                f"every checkpoint in {path} is incomplete (a run killed while saving); "
                f"rerun the training command to resume from an earlier one, or name a file"
            )
        else:
            raise CheckpointError(f"no checkpoint (*.pt) in {path}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_payload(path: str | os.PathLike) -> tuple[Path, Any]:
    """(the file `path` names, what it holds): one `torch.load`, or the sharded folder's model."""
    path = checkpoint_file(path)
    try:
        payload = (
            _read_sharded(path)
            if path.is_dir()
            else torch.load(path, map_location="cpu", weights_only=False)
        )
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    return path, payload


def is_foreign(payload: Any) -> bool:
    """Whether `payload` is a Composer checkpoint that ettin's trainer did not write (no RunInfo)."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("state"), dict)
        and "model" in payload["state"]
        and not (payload["state"].get("callbacks") or {}).get("RunInfo")
    )


def checkpoint_info(meta: dict[str, Any]) -> CheckpointInfo:
    """A `CheckpointInfo` from the metadata dict that `RunInfo` and ettin files store."""
    return CheckpointInfo(
        model_args=ModelArgs(**meta["model_args"]),
        objective=meta["objective"],
        tokenizer=dict(meta.get("tokenizer") or {}),
        lineage=dict(meta.get("lineage") or {}),
        max_seq_len=meta.get("max_seq_len"),
        hf_config=dict(meta.get("hf_config") or {}),
    )


def ettin_weights(payload: Any, source: str) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The model state dict and metadata of a loaded ettin file or ettin-written Composer checkpoint."""
    if isinstance(payload, dict) and payload.get("ettin_format") == ETTIN_FORMAT:
        return payload["state_dict"], checkpoint_info(payload)
    if is_foreign(payload):
        raise CheckpointError(
            f"{source} is a Composer checkpoint without ettin's RunInfo metadata: ettin's trainer "
            "did not write it. A reference (FlexBert) checkpoint is read by "
            "ettin.interop.formats.read_any_checkpoint (what init_from= and `ettin export` use), "
            "or converted once with `ettin import REF.pt OUT.pt`"
        )
    if isinstance(payload, dict) and isinstance(payload.get("state"), dict):
        state = payload["state"]
        if "model" in state:
            return _strip(state["model"]), checkpoint_info(state["callbacks"]["RunInfo"])
    raise CheckpointError(f"{source} is neither an ettin nor a Composer checkpoint")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The model state dict and metadata of a Composer or ettin checkpoint (see `checkpoint_file`).

    A checkpoint in a foreign format is refused, naming the reader that accepts it
    (`ettin.interop.formats.read_any_checkpoint`).
    """
    path, payload = load_payload(path)
    return ettin_weights(payload, str(path))


def load_weights(
    model: EttinModel, state: dict[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Copy `state` into `model`, naming the first missing, unexpected or mis-shaped tensor."""
    try:
        load_state_dict_strict(model, state)
    except CheckpointError as err:
        raise CheckpointError(
            f"{source}: {err}. Use a checkpoint of the same size (model.size) as this run."
        ) from err


def load_state_dict_strict(model: EttinModel, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict under our names into `model`, or say exactly what differs (CheckpointError).

    A missing `decoder.weight` is fine (it is tied to the embedding; HF does not save it).
    """
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name in state and state[name].shape != tensor.shape:
            raise CheckpointError(
                f"state dict does not fit this model (another size?): first mismatched tensor {name!r} "
                f"expected shape {tuple(tensor.shape)}, found {tuple(state[name].shape)}"
            )
    missing = [n for n in expected if n not in state and n != "decoder.weight"]
    unexpected = [n for n in state if n not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(biases or other extra tensors are not part of the Ettin architecture)"
        )
    embedding = state["model.embeddings.tok_embeddings.weight"]
    if "decoder.weight" in state and not torch.equal(state["decoder.weight"], embedding):
        raise CheckpointError(
            "decoder.weight differs from the token embedding; untied output layers are unsupported"
        )
    model.load_state_dict({**state, "decoder.weight": embedding}, strict=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[EttinModel, CheckpointInfo]:
    """Rebuild the model a checkpoint holds, weights included."""
    state, info = read_checkpoint(path)
    model = EttinModel(info.model_args)
    load_weights(model, state, source=str(path))
    return model, info


class RunInfo(Callback):
    """Stores the model's metadata inside every Composer checkpoint (read by `read_checkpoint`)."""

    def __init__(self, info: CheckpointInfo) -> None:
        self.info = info

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_args": dataclasses.asdict(self.info.model_args),
            "objective": self.info.objective,
            "tokenizer": self.info.tokenizer,
            "lineage": self.info.lineage,
            "max_seq_len": self.info.max_seq_len,
            "hf_config": self.info.hf_config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # when resuming, the run's own config is the source of truth
