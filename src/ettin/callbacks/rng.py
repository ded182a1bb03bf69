"""Dropout (all torch RNG use inside a training step) as a function of (seed, step, rank, microbatch).

Composer 0.32.1 restores the torch RNG from a checkpoint only at an epoch boundary or while
spinning the dataloader (`spin_dataloaders=False` here, see `ettin.data.loader`), so after a
restart mid-epoch the dropout masks would come from a different generator state and the
losses would drift from the uninterrupted run. `StepRNG` removes the dependence on history:
before every microbatch's forward (`Event.BEFORE_FORWARD`, which fires once per microbatch;
`BEFORE_TRAIN_BATCH` starts the count at 0 again, also on an auto-microbatching retry) it
reseeds the torch generators (CPU and every CUDA device, `torch.manual_seed`) with a hash of
(seed, global batch index, global rank, microbatch index). A resumed run therefore draws the
same masks as an uninterrupted one. The MLM masks are untouched (they hash their own counters,
`ettin.objectives`); activation checkpointing replays the stashed RNG state in its recompute,
so it sees the same masks; evaluation runs without dropout.
"""

from __future__ import annotations

import hashlib
import struct

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def step_seed(seed: int, batch: int, rank: int, microbatch: int) -> int:
    """A 63-bit seed from (seed, batch, rank, microbatch): blake2b of the four as int64."""
    digest = hashlib.blake2b(
        struct.pack("<4q", int(seed), int(batch), int(rank), int(microbatch)),
        digest_size=8,
        person=b"ettin-dropout",
    ).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StepRNG(Callback):
    """Reseed torch's generators before each microbatch's forward from (seed, step, rank, microbatch)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._microbatch = 0

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._microbatch = 0

    def before_forward(self, state: State, logger: Logger) -> None:
        torch.manual_seed(
            step_seed(
                self.seed, int(state.timestamp.batch), dist.get_global_rank(), self._microbatch
            )
        )
        self._microbatch += 1
