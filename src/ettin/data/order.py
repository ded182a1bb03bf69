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
without packing. A replayed order file (`data.order_file`) replaces both the permutation and
the schedule: step `k` is the rows of the file with the k-th step value, in file order.

Everything here is a pure function of (N, seed, schedule, epoch, step), so the order can be
exported before a run, audited after it, and resumed exactly.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ettin.data.dataset import DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from ettin.data.dataset import TokenDataset

log = logging.getLogger(__name__)

ORDER_COLUMNS = ("step", "sample_id")
"""Required columns of an order file; `epoch` (mask epoch) and `input_ids` are optional."""


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


def parse_tokens(value: str | int) -> int:
    """'50_000_000_000tok' (a Composer time string in tokens) or an int -> number of tokens."""
    if isinstance(value, int):
        return value
    from composer.core import Time, TimeUnit

    try:
        t = Time.from_timestring(str(value))
    except ValueError as err:
        raise ValueError(f"{value!r} is not a token count such as '50_000_000tok'") from err
    if t.unit != TimeUnit.TOKEN:
        raise ValueError(f"{value!r} must be in tokens (suffix 'tok'), not {t.unit.value}")
    return int(t.value)


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
                raise ValueError(
                    "data.batch_size_warmup_tokens is set but data.batch_size_warmup_min is 0; "
                    "set the smallest global batch (a divisor of global_train_batch_size)"
                )
            if self.full % self.min_size:
                raise ValueError(
                    f"data.batch_size_warmup_min={self.min_size} must divide the global batch "
                    f"size {self.full}: warm-up sizes are multiples of it"
                )

    @classmethod
    def from_config(
        cls, global_batch_size: int, *, warmup_tokens: str | int, warmup_min: int, max_seq_len: int
    ):
        """The schedule of `data.batch_size_warmup_*` for this global batch size."""
        tokens = parse_tokens(warmup_tokens)
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
                raise ValueError("batch-size warm-up longer than 50M steps; check its settings")
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
        return np.asarray([self.size(t) for t in range(first, first + count)], np.int64)


# --------------------------------------------------------------------------- replay


@dataclass
class Replay:
    """A recorded order: global step k is `sample_ids[bounds[k]:bounds[k+1]]`."""

    sample_ids: np.ndarray
    bounds: np.ndarray
    epochs: np.ndarray | None
    source: str
    first_step: int

    @property
    def num_steps(self) -> int:
        return len(self.bounds) - 1

    def batch(self, k: int) -> np.ndarray:
        return self.sample_ids[self.bounds[k] : self.bounds[k + 1]]

    def epoch_of(self, k: int) -> np.ndarray | None:
        if self.epochs is None:
            return None
        return self.epochs[self.bounds[k] : self.bounds[k + 1]]

    @classmethod
    def from_table(cls, table: pa.Table, source: str = "order table") -> Replay:
        names = set(table.column_names)
        missing = [c for c in ORDER_COLUMNS if c not in names]
        if missing:
            raise DataError(
                f"{source}: order file has no {' / '.join(missing)} column (columns: "
                f"{sorted(names)}); an order file has one row per sample with `step` and "
                f"`sample_id` (write one with `ettin order export`)"
            )
        steps = np.asarray(table.column("step").to_numpy(), np.int64)
        ids = np.asarray(table.column("sample_id").to_numpy(), np.int64)
        epochs = (
            np.asarray(table.column("epoch").to_numpy(), np.int64) if "epoch" in names else None
        )
        if len(steps) == 0:
            raise DataError(f"{source}: the order file is empty")
        order = np.argsort(steps, kind="stable")  # keep file order inside a step
        steps, ids = steps[order], ids[order]
        epochs = epochs[order] if epochs is not None else None
        uniq, starts = np.unique(steps, return_index=True)
        if len(uniq) != uniq[-1] - uniq[0] + 1:
            gap = int(uniq[np.nonzero(np.diff(uniq) != 1)[0][0]]) + 1
            raise DataError(f"{source}: steps are not contiguous (step {gap} is missing)")
        if (ids < 0).any():
            raise DataError(
                f"{source}: negative sample_id at step {int(steps[np.argmax(ids < 0)])}"
            )
        bounds = np.append(starts, len(steps)).astype(np.int64)
        return cls(
            sample_ids=ids, bounds=bounds, epochs=epochs, source=source, first_step=int(uniq[0])
        )


def read_order(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """An order table from a Parquet file or a folder of Parquet parts (the recorder's output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise DataError(f"{path}: folder holds no .parquet parts")
        return pa.concat_tables(
            [pq.read_table(p, columns=columns) for p in parts], promote_options="default"
        )
    if not path.exists():
        raise DataError(f"order file {path} not found")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: not a readable Parquet order file ({err})") from err


# --------------------------------------------------------------------------- the order


class DataOrder:
    """Global batches per (epoch, step in epoch) for a dataset of `num_samples` samples.

    `epoch_offset` shifts the permutation (and mask) epoch: Composer epoch `e` uses permutation
    epoch `e + epoch_offset`, while the batch-size schedule follows Composer's global step.
    """

    def __init__(
        self,
        num_samples: int,
        schedule: BatchSchedule,
        seed: int,
        *,
        replay: Replay | None = None,
        epoch_offset: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.schedule = schedule
        self.seed = seed
        self.replay = replay
        self.epoch_offset = epoch_offset
        self._epoch_steps: list[int] = []  # steps of epochs 0, 1, ... (computed lazily)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation): one at a time
        if replay is None and schedule.size(0) > num_samples:
            raise DataError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({schedule.size(0)}); use more data or a smaller global batch"
            )
        if replay is not None:
            top = int(replay.sample_ids.max())
            if top >= num_samples:
                raise DataError(
                    f"{replay.source}: sample_id {top} is out of range for this dataset "
                    f"({num_samples} samples); the order file belongs to another dataset"
                )

    # -- epochs ------------------------------------------------------------------------------

    def steps_in_epoch(self, epoch: int) -> int:
        """Number of global steps of (Composer) epoch `epoch`."""
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
        """Global step at which epoch `epoch` begins."""
        return sum(self.steps_in_epoch(e) for e in range(epoch))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step in epoch) of global step `step`."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    # -- batches -----------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (
                epoch,
                permutation(self.num_samples, self.seed, epoch + self.epoch_offset),
            )
        return self._perm[1]

    def batch_bounds(self, k: int, epoch: int) -> tuple[int, int]:
        """[lo, hi) of step `k` of epoch `epoch` inside that epoch's permutation."""
        t0 = self.epoch_start_step(epoch)
        lo = self.schedule.start(t0 + k) - self.schedule.start(t0)
        return lo, lo + self.schedule.size(t0 + k)

    def global_batch(self, k: int, epoch: int) -> np.ndarray:
        """Sample ids of step `k` (0-based, inside epoch `epoch`) over all ranks, in order."""
        n_steps = self.steps_in_epoch(epoch)
        if not 0 <= k < n_steps:
            raise IndexError(f"step {k} is outside epoch {epoch} ({n_steps} steps)")
        if self.replay is not None:
            return self.replay.batch(k)
        lo, hi = self.batch_bounds(k, epoch)
        return self._permutation(epoch)[lo:hi]

    def mask_epochs(self, k: int, epoch: int) -> np.ndarray:
        """The epoch each sample of step `k` uses for its MLM mask (aligned with global_batch)."""
        n = len(self.global_batch(k, epoch))
        if self.replay is not None:
            recorded = self.replay.epoch_of(k)
            base = recorded if recorded is not None else np.zeros(n, np.int64)
            # A replay that is run past its end starts again; later passes draw fresh masks.
            span = int(self.replay.epochs.max()) + 1 if self.replay.epochs is not None else 1
            return base + epoch * span
        return np.full(n, epoch + self.epoch_offset, np.int64)

    def global_step(self, k: int, epoch: int) -> int:
        """Global step number of step `k` of epoch `epoch` (the order file's `step`)."""
        if self.replay is not None:
            return self.replay.first_step + epoch * self.replay.num_steps + k
        return self.epoch_start_step(epoch) + k

    def step_at_sample(self, epoch: int, samples: int) -> int:
        """The step of epoch `epoch` that starts after `samples` samples of that epoch.

        Composer checkpoints `timestamp.sample_in_epoch`; this turns it back into a step.
        """
        n_steps = self.steps_in_epoch(epoch)
        if self.replay is not None:
            offsets = self.replay.bounds - self.replay.bounds[0]
            k = int(np.searchsorted(offsets, samples))
            ok = k < len(offsets) and offsets[k] == samples
        else:
            t0 = self.epoch_start_step(epoch)
            k, ok = 0, False
            lo, hi = 0, n_steps
            while lo <= hi:  # bisect over the monotone start offsets
                mid = (lo + hi) // 2
                off = self.schedule.start(t0 + mid) - self.schedule.start(t0)
                if off == samples:
                    k, ok = mid, True
                    break
                if off < samples:
                    lo = mid + 1
                else:
                    hi = mid - 1
        if not ok or k > n_steps:
            raise DataError(
                f"cannot resume: {samples} samples into epoch {epoch} is not a step boundary of "
                f"this data order (changed global batch size, warm-up or order file since the "
                f"checkpoint?). Restore those settings, or start the phase again."
            )
        return k

    def iter_steps(
        self, first_step: int = 0, num_steps: int | None = None
    ) -> Iterator[tuple[int, int, int]]:
        """(global step, epoch, step in epoch) from `first_step`, for `num_steps` steps."""
        epoch, k = self.locate(first_step)
        step = first_step
        while num_steps is None or step < first_step + num_steps:
            if k >= self.steps_in_epoch(epoch):
                epoch, k = epoch + 1, 0
                continue
            yield step, epoch, k
            step, k = step + 1, k + 1


def build_order(
    num_samples: int,
    *,
    global_batch_size: int,
    seed: int,
    max_seq_len: int,
    warmup_tokens: str | int = 0,
    warmup_min: int = 0,
    order_file: str | None = None,
    epoch_offset: int = 0,
) -> DataOrder:
    """The DataOrder of a phase from its config values (see `ettin.data.loader`)."""
    schedule = BatchSchedule.from_config(
        global_batch_size,
        warmup_tokens=warmup_tokens,
        warmup_min=warmup_min,
        max_seq_len=max_seq_len,
    )
    replay = None
    if order_file:
        replay = Replay.from_table(read_order(order_file), source=str(order_file))
    return DataOrder(num_samples, schedule, seed, replay=replay, epoch_offset=epoch_offset)


# --------------------------------------------------------------------------- export / audit


def export_order(
    order: DataOrder,
    steps: int,
    *,
    first_step: int = 0,
    dataset: TokenDataset | None = None,
) -> pa.Table:
    """One row per sample of global steps first_step .. first_step+steps-1: step, sample_id, epoch.

    With `dataset`, an `input_ids` list column holds each sample after the sample rules (BOS,
    truncation, EOS for encoders), i.e. exactly what the model is fed before masking.
    """
    import pyarrow as pa

    step_col, id_col, epoch_col = [], [], []
    for step, epoch, k in order.iter_steps(first_step, steps):
        ids = order.global_batch(k, epoch)
        step_col.append(np.full(len(ids), step, np.int64))
        id_col.append(ids)
        epoch_col.append(order.mask_epochs(k, epoch))
    cat = (lambda xs: np.concatenate(xs)) if step_col else (lambda xs: np.zeros(0, np.int64))
    cols = {"step": cat(step_col), "sample_id": cat(id_col), "epoch": cat(epoch_col)}
    table = pa.table(cols)
    if dataset is not None:
        tokens = [dataset[int(i)][1].astype(np.uint32) for i in cols["sample_id"]]
        table = table.append_column("input_ids", pa.array(tokens, type=pa.list_(pa.uint32())))
    return table


def write_order(table: pa.Table, path: str | Path) -> Path:
    """Write an order table as one Parquet file (atomically)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


@dataclass
class AuditReport:
    """The result of comparing a recorded order with a planned one."""

    steps_compared: int
    first_differing_step: int | None
    detail: str
    same_order_within_steps: bool

    @property
    def ok(self) -> bool:
        return self.first_differing_step is None

    def __str__(self) -> str:
        if self.ok:
            how = (
                "same order"
                if self.same_order_within_steps
                else "same samples (order inside steps differs, e.g. packing)"
            )
            return f"OK: {self.steps_compared} steps match ({how})"
        return f"DIFFERENT at step {self.first_differing_step}: {self.detail}"


def _group(table: pa.Table) -> dict[int, np.ndarray]:
    rep = Replay.from_table(table)
    return {rep.first_step + k: rep.batch(k) for k in range(rep.num_steps)}


def audit(recorded: pa.Table, planned: pa.Table) -> AuditReport:
    """Compare the samples of each step recorded during training with the planned order.

    Steps are compared on the steps both tables hold; a step differs when its set of sample
    ids differs (packing reorders samples inside a step, so order alone is reported apart).
    Recorded steps absent from the plan count as a difference.
    """
    rec, plan = _group(recorded), _group(planned)
    same_order = True
    compared = 0
    for step in sorted(rec):
        if step not in plan:
            return AuditReport(compared, step, "step is recorded but not in the plan", same_order)
        a, b = rec[step], plan[step]
        compared += 1
        if len(a) != len(b) or not np.array_equal(np.sort(a), np.sort(b)):
            missing = np.setdiff1d(b, a)[:5].tolist()
            extra = np.setdiff1d(a, b)[:5].tolist()
            detail = f"{len(a)} recorded vs {len(b)} planned samples; planned but not seen {missing}, seen but not planned {extra}"
            return AuditReport(compared, step, detail, same_order)
        same_order = same_order and bool(np.array_equal(a, b))
    return AuditReport(compared, None, "", same_order)
