"""Training from order files, and exporting and auditing orders (above `ettin.data.order`).

An order file (`ettin.data.order_file`: one file, a folder of parts or the published tree, its
parts and step index) of one of two kinds is read by `data.order_file`:

- **sample ids** (`step`, `sample_id`, optional `epoch`): what `ettin order export` and the
  recorder write. The ids index the phase's shards (`data.path`), which supply the tokens.
- **tokens** (`step`, `input_ids`, optional `sample_id`, `epoch`): the published
  `ettin-data-order` schema (`step`, `input_ids`), or `ettin order export --with-tokens`. The file
  *is* the data: no shards are read (`OrderTokens`). A sample's global id, which seeds its MLM
  mask, is the file's `sample_id` when it has one, otherwise its **row position** in the
  selected phase (rows counted over the parts in step order, skipped steps included), so it is
  stable across resumes.

`check_fits` holds a token file against the run: each step must hold the run's global batch of
that step (its batch-size schedule, warm-up included), rows at most `max_seq_len` tokens, ids in
the vocabulary. The sample rules (`SampleRules`) are applied to file tokens too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from ettin.data.dataset import SampleRules, TokenDataset
from ettin.data.order import BatchSchedule, DataOrder
from ettin.data.order_file import (
    PUBLISHED_COLUMNS,
    Replay,
    out_of_vocab,
    read_group,
    read_order,
    too_long,
    write_order,
)
from ettin.data.shards import DataError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "AuditReport",
    "OrderTokens",
    "Replay",
    "audit",
    "check_fits",
    "export_order",
    "open_train_data",
    "read_order",
    "write_order",
]

log = logging.getLogger(__name__)

EAGER_CHECK_MAX_BYTES = 1 << 30
"""Token files at most this large have every row checked (length, vocabulary) when opened;
larger ones are checked row by row as they are read (and fully by `ettin order replay`)."""
SHOWN_STEPS = 5
"""Steps listed by name when a file's batch sizes do not fit the run."""


# --------------------------------------------------------------------------- does it fit the run


def _schedule_words(schedule: BatchSchedule) -> str:
    if schedule.warmup_steps:
        return (
            f"batch-size warm-up from {schedule.size(0)} over {schedule.warmup_steps} steps, then "
            f"{schedule.full}"
        )
    return f"{schedule.full} rows every step, no batch-size warm-up"


def check_fits(
    replay: Replay, schedule: BatchSchedule, max_seq_len: int, vocab_size: int | None
) -> None:
    """A token file must fit the run: each step holds the run's global batch of that step
    (`schedule`, warm-up included), and (files up to `EAGER_CHECK_MAX_BYTES`) every row is at
    most `max_seq_len` tokens with ids inside the vocabulary. A mismatch names, per step, what
    the file holds and what the run expects."""
    sizes = replay.sizes
    want = schedule.sizes(0, len(sizes))
    bad = np.nonzero(sizes != want)[0]
    if len(bad):
        shown = "; ".join(
            f"step {replay.first_step + int(k)} has {int(sizes[k])} samples but the run's global "
            f"batch at that step is {int(want[k])}"
            for k in bad[:SHOWN_STEPS]
        )
        more = f"; and {len(bad) - SHOWN_STEPS} more steps" if len(bad) > SHOWN_STEPS else ""
        first = int(sizes[0])
        if (sizes == first).all():
            fix = (
                f"The file holds {first} rows in every step: train on it with "
                f"global_train_batch_size={first} and data.batch_size_warmup_tokens=0tok"
            )
        else:
            fix = (
                f"The file's steps hold {int(sizes.min())} to {int(sizes.max())} rows: set "
                f"global_train_batch_size and data.batch_size_warmup_* to the schedule that made "
                f"it (`ettin order replay` lists its sizes)"
            )
        raise DataError(
            f"{replay.source}: {len(bad)} of {len(sizes)} steps differ from the run's batch-size "
            f"schedule ({_schedule_words(schedule)}): {shown}{more}. {fix}"
        )
    if sum(p.stat().st_size for p in replay.parts) > EAGER_CHECK_MAX_BYTES:
        return
    replay.check_rows(max_seq_len, vocab_size)


# --------------------------------------------------------------------------- the file's samples


class OrderTokens(Dataset):
    """The samples of a token order file: `ds[row] -> (global id, ids)`, sample rules applied.

    The global id (the MLM mask's) is the file's `sample_id` of the row, or the row itself. Row
    groups are read on demand and the last few are kept, per process (DataLoader workers too).
    """

    CACHE = 4

    def __init__(self, replay: Replay, rules: SampleRules) -> None:
        self.replay, self.rules = replay, rules
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._warned_truncation = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return self.replay.num_rows

    def raw(self, row: int) -> np.ndarray:
        groups = self.replay.groups
        g = int(np.searchsorted(groups[:, 2], row, side="right")) - 1
        if g not in self._cache:
            part, group, _ = groups[g].tolist()
            self._cache[g] = read_group(self.replay.parts[part], group)
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        values, offsets = self._cache[g]
        r = row - int(groups[g, 2])
        return values[offsets[r] : offsets[r + 1]]

    def __getitem__(self, row: int) -> tuple[int, np.ndarray]:
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside {self.replay.source} ({len(self)} rows)")
        raw, rules, rep = self.raw(row), self.rules, self.replay
        if len(raw) > rules.max_seq_len:
            raise DataError(too_long(rep, row, len(raw), rules.max_seq_len))
        if rules.vocab_size is not None and len(raw) and int(raw.max()) >= rules.vocab_size:
            raise DataError(out_of_vocab(rep, row, int(raw.max()), rules.vocab_size))
        if not self._warned_truncation and len(raw) and raw[0] != rules.cls_id:
            if len(raw) == rules.max_seq_len:
                self._warned_truncation = True
                log.warning(
                    "%s: row %d has %d tokens and no [CLS]; prepending it drops the last token",
                    rep.source,
                    row,
                    len(raw),
                )
        ids = rules.apply(raw, where=f"{rep.source}: {rep.where(row)}")
        gid = int(rep.sample_ids[row]) if rep.sample_ids is not None else row
        return gid, ids


def open_train_data(data_cfg: Any, rules: SampleRules, tokenizer: Any = None):
    """(train dataset, replay or None) of a run: the shards, or the order file's tokens."""
    replay = None
    if data_cfg.order_file:
        replay = Replay.open(
            data_cfg.order_file,
            local_cache=data_cfg.local_cache,
            phase=getattr(data_cfg, "order_phase", None),
        )
        if replay.has_tokens:
            return OrderTokens(replay, rules), replay
    base = TokenDataset(
        data_cfg.path,
        data_cfg.train_split,
        rules,
        tokenizer=tokenizer,
        local_cache=data_cfg.local_cache,
    )
    return base, replay


# --------------------------------------------------------------------------- export / audit


def export_order(
    order: DataOrder,
    steps: int,
    *,
    first_step: int = 0,
    dataset: Any = None,
    tokens_only: bool = False,
) -> pa.Table:
    """One row per sample of run steps first_step .. first_step+steps-1: step, sample_id, epoch.

    With `dataset`, an `input_ids` list column holds each sample after the sample rules (BOS,
    truncation, EOS for encoders), i.e. exactly what the model is fed before masking. With
    skipped steps (`data.skip_steps`) `step` is the run's step and `order_step` the order's.
    `tokens_only` writes the published schema: `step` and `input_ids` only.
    """
    import pyarrow as pa

    step_col, order_col, id_col, epoch_col = [], [], [], []
    for run_step, (step, epoch, k) in enumerate(order.iter_steps(first_step, steps), first_step):
        ids = order.global_batch(k, epoch)
        step_col.append(np.full(len(ids), run_step, np.int64))
        order_col.append(np.full(len(ids), step, np.int64))
        id_col.append(ids)
        epoch_col.append(order.mask_epochs(k, epoch))

    def cat(xs):
        return np.concatenate(xs) if xs else np.zeros(0, np.int64)

    cols = {"step": cat(step_col), "sample_id": cat(id_col), "epoch": cat(epoch_col)}
    if order.skip_ranges:
        cols["order_step"] = cat(order_col)
    rows = cols["sample_id"]
    table = pa.table(cols)
    if dataset is not None:
        tokens = [dataset[int(i)][1].astype(np.uint32) for i in rows]
        if order.replay is not None and order.replay.has_tokens:  # ids are rows of the file
            table = table.set_column(1, "sample_id", pa.array([dataset[int(i)][0] for i in rows]))
        table = table.append_column("input_ids", pa.array(tokens, type=pa.list_(pa.uint32())))
    if tokens_only:
        table = table.select(list(PUBLISHED_COLUMNS))
    return table


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
    """Sample ids per order step (`order_step` when the table has it, else `step`)."""
    import pyarrow.compute as pc

    names = table.column_names
    if "step" not in names or "sample_id" not in names:
        raise DataError(f"an order table needs `step` and `sample_id` columns; it has {names}")
    col = table.column("step")
    if "order_step" in names:  # parts recorded before a skip range was added have none
        col = pc.coalesce(table.column("order_step"), col)
    steps = np.asarray(col.to_numpy(), np.int64)
    ids = np.asarray(table.column("sample_id").to_numpy(), np.int64)
    order = np.argsort(steps, kind="stable")
    steps, ids = steps[order], ids[order]
    uniq, starts = np.unique(steps, return_index=True)
    return dict(zip(uniq.tolist(), np.split(ids, starts[1:])))


def audit(recorded: pa.Table, planned: pa.Table, *, ordered: bool = True) -> AuditReport:
    """Compare the samples of each step recorded during training with the planned order.

    Steps are compared on the steps both tables hold, by order step (`order_step` where a
    table has one: runs with skipped steps). With `ordered` (the default: padded runs, where
    the order inside a step decides the microbatches and the ranks' shares) a step differs
    when its sequence of sample ids differs; with `ordered=False` (packed runs, where packing
    reorders samples inside a step) only when its set differs, and order alone is reported
    apart. Recorded steps absent from the plan count as a difference.
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
        in_order = bool(np.array_equal(a, b))
        if ordered and not in_order:
            pos = int(np.argmax(a != b))
            detail = (
                f"same samples in another order: position {pos} holds {int(a[pos])}, planned "
                f"{int(b[pos])} (order inside a step matters unless the run packs sequences: "
                f"--packed)"
            )
            return AuditReport(compared, step, detail, False)
        same_order = same_order and in_order
    return AuditReport(compared, None, "", same_order)
