"""Reading a checkpoint in any format ettin knows: its own, and the reference training's.

`ettin.checkpoint` reads what ettin writes (ettin files, Composer run checkpoints with `RunInfo`,
sharded ones) and knows no foreign format; `ettin.interop.reference` converts the reference's
FlexBert checkpoints. This module is where the two meet: callers that accept a foreign checkpoint
(`init_from=`, `ettin export`, `ettin export --all`) import `read_any_checkpoint` from here, so
the dependency is an import anyone can see, not a registry filled as a side effect of importing.
"""

from __future__ import annotations

import os

import torch

from ettin.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    checkpoint_info,
    ettin_weights,
    is_foreign,
    load_payload,
    load_weights,
)
from ettin.interop.reference import is_reference_state, reference_weights
from ettin.model import EttinModel

__all__ = ["load_any_checkpoint", "read_any_checkpoint"]


def read_any_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The state dict (our names) and metadata of an ettin or a reference checkpoint.

    `path` is resolved as `ettin.checkpoint.read_checkpoint` resolves it (a folder: its
    `latest-rank0.pt`, newest complete checkpoint or only `*.pt` file) and loaded once.
    """
    path, payload = load_payload(path)
    if not is_foreign(payload):
        return ettin_weights(payload, str(path))
    if is_reference_state(payload["state"]):
        state, meta = reference_weights(payload, str(path))
        return state, checkpoint_info(meta)
    raise CheckpointError(
        f"{path} is a Composer checkpoint that neither ettin's trainer (no RunInfo metadata) nor "
        "the reference training (no model.bert.* weights) wrote; ettin cannot read its weights"
    )


def load_any_checkpoint(path: str | os.PathLike) -> tuple[EttinModel, CheckpointInfo]:
    """Rebuild the model an ettin or reference checkpoint holds, weights included."""
    state, info = read_any_checkpoint(path)
    model = EttinModel(info.model_args)
    load_weights(model, state, source=str(path))
    return model, info
