"""The global data order: which samples form each optimiser step, on every rank.

The rule (reference recipe §4.3, made explicit and rank-independent):

- epoch `e` shuffles the N samples of the phase with
  `np.random.Generator(np.random.PCG64DXSM(seed + e)).permutation(N)`;
- step `k` of the epoch takes the next contiguous block of that permutation, whose size is the
  global batch size of that step (the last partial block is dropped);
- rank `r` of `W` takes the contiguous slice `block[r*n//W : (r+1)*n//W]` of the block, so the
  ranks' slices concatenated in rank order are the block itself, for any `W`.

The global batch size is constant (`global_batch_size`) unless batch-size warm-up is on: then
it grows from `batch_size_warmup_min` to the full size in steps of `batch_size_warmup_min` over
`batch_size_warmup_tokens`, each size lasting a token span proportional to itself (as in the
reference packer). A sample counts as `max_seq_len` tokens for the schedule, so the size of step
`t` is a pure function of `t`: it is the same for MLM and CLM, for any world size, with or
without packing. An order file (`data.order_file`, `ettin.data.order_file`) replaces both the
permutation and the schedule: step k is the rows of the file with the k-th step value.

Skip ranges (`ettin.data.skips`: `data.skip_steps` plus `<run_dir>/skip_steps.json`) remove
order steps: `[a, b]` drops the steps `a <= step < b` of the order (the `step` of `ettin order
export`, or of the order file), and the run trains on the steps after them as if they did not
exist, its own step counter (and so the LR schedule) going on. Inside an epoch the run's j-th
step is the j-th kept step (`kept`), which is all the resume arithmetic needs (`step_at_sample`).
`order_for_run` is the order a run trains on (its config and its folder's skip file): training
and `ettin order export` both build it, so the export lists what the run trains on.

Everything here is a pure function of (N, seed, schedule, skips, epoch, step), so the order can
be exported before a run, audited after it, and resumed exactly.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ettin.config import ConfigError, token_count
from ettin.data.order_file import Replay
from ettin.data.shards import DataError
from ettin.data.skips import SKIP_FILE, merge, run_skips

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure functions


def permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The reference shuffle of epoch `epoch`: PCG64DXSM(seed + epoch).permutation(N) (int64)."""
    rng = np.random.Generator(np.random.PCG64DXSM(seed + epoch))
    return rng.permutation(num_samples).astype(np.int64, copy=False)


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous part of a global batch: `batch[r*n//W : (r+1)*n//W]`.

    Concatenating the slices of ranks 0..W-1 gives `batch` back, whatever W; when W divides
    the batch size every rank gets the same number of samples.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    n = len(batch)
    return batch[rank * n // world_size : (rank + 1) * n // world_size]


# --------------------------------------------------------------------------- batch-size schedule


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch size per global step, with the optional linear-in-size warm-up.

    Sizes during warm-up are `m, 2m, ..., full - m` with `m = min_size`; size `b_i` lasts
    `warmup_samples * b_i / sum(b)` samples (so every size gets about the same number of steps),
    then the size stays `full`. `warmup_samples = ceil(warmup_tokens / max_seq_len)`.
    """

    full: int
    min_size: int = 0
    warmup_samples: int = 0

    def __post_init__(self) -> None:
        if self.full <= 0:
            raise ValueError(f"global batch size must be positive, got {self.full}")
        if self.warmup_samples > 0:
            if self.min_size <= 0:
                raise ConfigError(
                    "data.batch_size_warmup_tokens is set but data.batch_size_warmup_min is 0; "
                    "set the smallest global batch (a divisor of global_train_batch_size)"
                )
            if self.full % self.min_size:
                raise ConfigError(
                    f"data.batch_size_warmup_min={self.min_size} must divide the global batch "
                    f"size {self.full}: warm-up sizes are multiples of it"
                )

    @classmethod
    def from_config(
        cls, global_batch_size: int, *, warmup_tokens: str | int, warmup_min: int, max_seq_len: int
    ):
        """The schedule of `data.batch_size_warmup_*` for this global batch size."""
        tokens = token_count(warmup_tokens, "data.batch_size_warmup_tokens")
        samples = math.ceil(tokens / max_seq_len) if tokens > 0 else 0
        if samples and warmup_min >= global_batch_size:
            samples = 0  # nothing to grow
        return cls(full=global_batch_size, min_size=warmup_min, warmup_samples=samples)

    @cached_property
    def _warmup(self) -> tuple[np.ndarray, np.ndarray]:
        """(sizes of the warm-up steps, samples before each warm-up step and after the last)."""
        if self.warmup_samples <= 0 or self.min_size >= self.full:
            return np.zeros(0, np.int64), np.zeros(1, np.int64)
        sizes = np.arange(self.min_size, self.full, self.min_size, dtype=np.int64)
        cum = np.cumsum(sizes)
        thresholds = [math.ceil(self.warmup_samples * int(c) / int(cum[-1])) for c in cum]
        steps: list[int] = []
        seen = 0
        while seen < self.warmup_samples:
            i = bisect.bisect_right(thresholds, seen)  # first threshold > seen
            size = int(sizes[min(i, len(sizes) - 1)])
            steps.append(size)
            seen += size
            if len(steps) > 50_000_000:
                raise ConfigError(
                    "batch-size warm-up longer than 50M steps: check data.batch_size_warmup_tokens "
                    "and data.batch_size_warmup_min"
                )
        out = np.asarray(steps, np.int64)
        return out, np.concatenate([[0], np.cumsum(out)]).astype(np.int64)

    @property
    def warmup_steps(self) -> int:
        """Number of steps before the size is `full` for good."""
        return len(self._warmup[0])

    def size(self, step: int) -> int:
        """Global batch size of global step `step`."""
        sizes, _ = self._warmup
        return int(sizes[step]) if step < len(sizes) else self.full

    def start(self, step: int) -> int:
        """Samples (as scheduled) consumed by the global steps before `step`."""
        sizes, cum = self._warmup
        if step <= len(sizes):
            return int(cum[step])
        return int(cum[-1]) + (step - len(sizes)) * self.full

    def sizes(self, first: int, count: int) -> np.ndarray:
        """Sizes of steps first .. first+count-1."""
        out = np.full(count, self.full, np.int64)
        warm = self._warmup[0][first : first + count]
        out[: len(warm)] = warm
        return out


# --------------------------------------------------------------------------- the order


class DataOrder:
    """Global batches per (epoch, step in epoch) for a dataset of `num_samples` samples.

    "Step k of epoch e" is always the order's (planned) step; `kept(e)` lists the ones a run
    trains on (all of them unless `skip` removes some), so the run's j-th step of the epoch is
    step `kept(e)[j]`. `skip` holds ranges of global order steps (`global_step`).
    """

    def __init__(
        self,
        num_samples: int,
        schedule: BatchSchedule,
        seed: int,
        *,
        replay: Replay | None = None,
        skip: Iterable = (),
    ) -> None:
        self.num_samples = num_samples
        self.schedule = schedule
        self.seed = seed
        self.replay = replay
        self.skip_ranges = merge(skip)
        self._epoch_steps: list[int] = []  # steps of epochs 0, 1, ... (computed lazily)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation): one at a time
        self._kept: tuple[int, np.ndarray] | None = None  # (epoch, kept steps): one at a time
        if replay is None and schedule.size(0) > num_samples:
            raise DataError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({schedule.size(0)}); use more data or a smaller global batch"
            )
        if replay is not None and replay.sample_ids is not None and not replay.has_tokens:
            top = int(replay.sample_ids.max())
            if top >= num_samples:
                raise DataError(
                    f"{replay.source}: sample_id {top} is out of range for this dataset "
                    f"({num_samples} samples); the order file belongs to another dataset"
                )

    # -- epochs (the order's own steps) ------------------------------------------------------

    def steps_in_epoch(self, epoch: int) -> int:
        """Number of order steps of (Composer) epoch `epoch`, skipped ones included."""
        if self.replay is not None:
            return self.replay.num_steps
        while len(self._epoch_steps) <= epoch:
            t0 = sum(self._epoch_steps)
            self._epoch_steps.append(self._count_steps(t0))
        return self._epoch_steps[epoch]

    def _count_steps(self, t0: int) -> int:
        """Whole batches that fit in one permutation when the epoch starts at global step t0."""
        sched, n = self.schedule, self.num_samples
        k = 0
        while t0 + k < sched.warmup_steps:
            if sched.start(t0 + k + 1) - sched.start(t0) > n:
                return k
            k += 1
        used = sched.start(t0 + k) - sched.start(t0)
        return k + (n - used) // sched.full

    def epoch_start_step(self, epoch: int) -> int:
        """Order step (counted from 0) at which epoch `epoch` begins."""
        return sum(self.steps_in_epoch(e) for e in range(epoch))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step in epoch) of order step `step` (counted from 0)."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def step_sizes(self, epoch: int) -> np.ndarray:
        """Global batch size of each order step of epoch `epoch`."""
        if self.replay is not None:
            return self.replay.sizes
        return self.schedule.sizes(self.epoch_start_step(epoch), self.steps_in_epoch(epoch))

    # -- batches -----------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, permutation(self.num_samples, self.seed, epoch))
        return self._perm[1]

    def global_batch(self, k: int, epoch: int) -> np.ndarray:
        """Sample ids of order step `k` (0-based, inside epoch `epoch`) over all ranks, in order."""
        n_steps = self.steps_in_epoch(epoch)
        if not 0 <= k < n_steps:
            raise IndexError(f"step {k} is outside epoch {epoch} ({n_steps} steps)")
        if self.replay is not None:
            return self.replay.batch(k)
        t0 = self.epoch_start_step(epoch)
        lo = self.schedule.start(t0 + k) - self.schedule.start(t0)
        return self._permutation(epoch)[lo : lo + self.schedule.size(t0 + k)]

    def mask_epochs(self, k: int, epoch: int) -> np.ndarray:
        """The epoch each sample of step `k` uses for its MLM mask (aligned with global_batch)."""
        n = len(self.global_batch(k, epoch))
        if self.replay is not None:
            recorded = self.replay.epoch_of(k)
            base = recorded if recorded is not None else np.zeros(n, np.int64)
            # A replay that is run past its end starts again; later passes draw fresh masks.
            span = int(self.replay.epochs.max()) + 1 if self.replay.epochs is not None else 1
            return base + epoch * span
        return np.full(n, epoch, np.int64)

    def global_step(self, k: int, epoch: int) -> int:
        """Global order step of step `k` of epoch `epoch`: the order file's `step`, the
        `step` of `ettin order export`, and what skip ranges name."""
        if self.replay is not None:
            return self.replay.first_step + epoch * self.replay.num_steps + k
        return self.epoch_start_step(epoch) + k

    # -- what a run trains on ----------------------------------------------------------------

    def kept(self, epoch: int) -> np.ndarray:
        """The steps of epoch `epoch` (0-based in the epoch) that no skip range removes."""
        if self._kept is None or self._kept[0] != epoch:
            n = self.steps_in_epoch(epoch)
            g0 = self.global_step(0, epoch)
            steps = g0 + np.arange(n, dtype=np.int64)
            keep = np.ones(n, bool)
            for a, b in self.skip_ranges:
                keep &= (steps < a) | (steps >= b)
            if n and not keep.any():
                raise DataError(
                    f"data.skip_steps removes every step of epoch {epoch} (steps {g0}-{g0 + n - 1}); "
                    f"skip fewer steps"
                )
            self._kept = (epoch, np.nonzero(keep)[0].astype(np.int64))
        return self._kept[1]

    def _offsets(self, epoch: int) -> np.ndarray:
        """Samples consumed before each kept step of the epoch, and after the last."""
        sizes = self.step_sizes(epoch)[self.kept(epoch)]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def step_at_sample(self, epoch: int, samples: int) -> int:
        """How many kept steps of epoch `epoch` make up its first `samples` samples.

        Composer checkpoints `timestamp.sample_in_epoch`; this turns it back into a step.
        """
        offsets = self._offsets(epoch)
        j = int(np.searchsorted(offsets, samples))
        if j >= len(offsets) or offsets[j] != samples:
            raise DataError(
                f"cannot resume: {samples} samples into epoch {epoch} is not a step boundary of "
                f"this data order (changed global batch size, warm-up, order file or skipped "
                f"steps before the checkpoint?). Restore those settings, or start the phase again."
            )
        return j

    def next_step(self, epoch: int, j: int) -> int:
        """The global order step a run trains after `j` kept steps of the epoch (or the end)."""
        kept = self.kept(epoch)
        k = int(kept[j]) if j < len(kept) else self.steps_in_epoch(epoch)
        return self.global_step(k, epoch)

    def resume_index(self, epoch: int, samples: int, next_step: int) -> int:
        """Like `step_at_sample`, for a checkpoint that was about to train order step
        `next_step`: resume at the first kept step >= it, so skip ranges added since (at or
        after it, as a rewind writes them) are honoured; `samples` must still match."""
        kept_steps = self.global_step(0, epoch) + self.kept(epoch)
        j = int(np.searchsorted(kept_steps, next_step))
        if self._offsets(epoch)[j] != samples:
            raise DataError(
                f"cannot resume: {samples} samples into epoch {epoch} is not a step boundary of "
                f"this data order before order step {next_step} (changed global batch size, "
                f"warm-up, order file, or data.skip_steps before the checkpoint's step "
                f"{next_step}?). Skip ranges may only start at or after {next_step}; restore the "
                f"settings, or start the phase again."
            )
        return j

    def iter_steps(
        self, first_step: int = 0, num_steps: int | None = None
    ) -> Iterator[tuple[int, int, int]]:
        """(global order step, epoch, step in epoch) of the run's steps from `first_step`."""
        epoch, j = 0, first_step
        while j >= len(self.kept(epoch)):
            j -= len(self.kept(epoch))
            epoch += 1
        done = 0
        while num_steps is None or done < num_steps:
            kept = self.kept(epoch)
            if j >= len(kept):
                epoch, j = epoch + 1, 0
                continue
            k = int(kept[j])
            yield self.global_step(k, epoch), epoch, k
            j, done = j + 1, done + 1


def build_order(
    num_samples: int,
    *,
    global_batch_size: int,
    seed: int,
    max_seq_len: int,
    warmup_tokens: str | int = 0,
    warmup_min: int = 0,
    order_file: str | Replay | None = None,
    skip_steps: Iterable = (),
) -> DataOrder:
    """The DataOrder of a phase from its config values (see `ettin.data.loader`)."""
    schedule = BatchSchedule.from_config(
        global_batch_size,
        warmup_tokens=warmup_tokens,
        warmup_min=warmup_min,
        max_seq_len=max_seq_len,
    )
    replay = order_file
    if isinstance(order_file, str | Path):
        replay = Replay.open(order_file)
    return DataOrder(num_samples, schedule, seed, replay=replay or None, skip=skip_steps)


def order_for_run(
    data_cfg: Any,
    num_samples: int,
    *,
    global_batch_size: int,
    replay: Replay | None = None,
    run_dir: str | Path | None = None,
) -> DataOrder:
    """The order a run trains on: its `data` config, less `data.skip_steps` and the ranges of
    `<run_dir>/skip_steps.json` (`ettin.data.skips.run_skips`, read on rank 0 and sent to every
    rank). Training (`ettin.data.loader`) and `ettin order export` both use it."""
    from composer.utils import dist

    skips = run_skips(data_cfg.skip_steps, run_dir)
    if dist.get_world_size() > 1 and run_dir is not None:
        box = [skips]
        dist.broadcast_object_list(box, src=0)
        skips = box[0]
    if skips:
        log.info("skipping the order steps %s (data.skip_steps, %s)", list(skips), SKIP_FILE)
    return build_order(
        num_samples,
        global_batch_size=global_batch_size,
        seed=data_cfg.shuffle_seed,
        max_seq_len=data_cfg.max_seq_len,
        warmup_tokens=data_cfg.batch_size_warmup_tokens,
        warmup_min=data_cfg.batch_size_warmup_min,
        order_file=replay,
        skip_steps=skips,
    )
