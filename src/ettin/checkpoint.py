"""Model weights in and out of checkpoints: Composer run checkpoints and plain ettin files.

A Composer checkpoint (`runs/<run>/checkpoints/*.pt`) holds the full training state; the
`RunInfo` callback stores beside it what is needed to rebuild the model without the config
(model args, objective, tokenizer). An ettin file (`ettin import` output) holds the same
metadata and a bare state dict. Both load into an `EttinModel` with `load_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback

from ettin.model import EttinModel, ModelArgs

ETTIN_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the requested model."""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about the model it holds."""

    model_args: ModelArgs
    objective: str
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """The tokenizer's fingerprint (ids of special tokens, vocab size) and its directory, if known."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """Where the run's starting weights came from: `init_from` and `init_digest` (see `state_digest`)."""


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


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The model state dict and metadata of a Composer or ettin checkpoint."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.pt"))
        latest = path / "latest-rank0.pt"
        if latest.exists():
            path = latest.resolve()
        elif candidates:
            path = candidates[-1]
        else:
            raise CheckpointError(f"no checkpoint (*.pt) in {path}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(payload, dict) and payload.get("ettin_format") == ETTIN_FORMAT:
        meta, state = payload, payload["state_dict"]
    elif isinstance(payload, dict) and "state" in payload and "model" in payload["state"]:
        meta = payload["state"].get("callbacks", {}).get("RunInfo")
        if not meta:
            raise CheckpointError(
                f"{path} is a Composer checkpoint without ettin RunInfo metadata; "
                "it was not written by ettin's trainer"
            )
        state = _strip(payload["state"]["model"])
    else:
        raise CheckpointError(f"{path} is neither an ettin nor a Composer checkpoint")
    info = CheckpointInfo(
        model_args=ModelArgs(**meta["model_args"]),
        objective=meta["objective"],
        tokenizer=dict(meta.get("tokenizer") or {}),
        lineage=dict(meta.get("lineage") or {}),
    )
    return state, info


def load_weights(
    model: EttinModel, state: dict[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Copy `state` into `model`, naming the first missing, unexpected or mis-shaped tensor."""
    from ettin.interop import load_hf_state_dict  # our names are the HF encoder names

    try:
        load_hf_state_dict(model, state)
    except ValueError as err:
        raise CheckpointError(
            f"{source}: {err}. Use a checkpoint of the same size (model.size) as this run."
        ) from err


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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # when resuming, the run's own config is the source of truth
