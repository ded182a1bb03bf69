"""Record the sample ids each optimiser step actually consumed, as a replayable order.

`DataOrderRecorder(out_path)` keeps, on every rank, the ids of each device batch it trains on
(`after_dataloader`; skipped batches are never seen). At every checkpoint and at the end of
`fit`, the ranks' lists are gathered on rank 0 and appended to `out_path`, a folder of Parquet
parts `part-<first step>-<last step>.parquet` with columns `step`, `sample_id`, `epoch` (the
mask epoch): the same columns as `ettin order export`, so `ettin order audit` and
`data.order_file=` read it directly (`ettin.data.replay.read_order`); `ettin order export
RUN.yaml data.order_file=OUT --format ettin` turns it into the published schema (`step`,
`input_ids`).

With skipped steps (`data.skip_steps`) `step` stays the run's step (so the folder replays what
was trained) and a column `order_step` holds the order step each batch came from, which never
takes a skipped value; `skipped_steps.json` in the folder lists the ranges in effect.

Resumption never duplicates steps: when `fit` starts at step k, rank 0 drops every recorded row
with step >= k (rows written after the checkpoint the run resumes from), and the resumed run
writes them again. Rows of a step are in rank order, each rank's rows in batch order, so for
padded batches a step's rows are exactly the planned global batch; packed rows are recorded
row by row (same samples, packing order).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from ettin.data.collate import batch_epochs, batch_sample_ids

log = logging.getLogger(__name__)

_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
SKIPPED = "skipped_steps.json"


def _part_name(first: int, last: int) -> str:
    return f"part-{first:010d}-{last:010d}.parquet"


class DataOrderRecorder(Callback):
    """Write the consumed order to `out_path/` (Parquet parts) at checkpoints and at fit end.

    It writes whenever the trainer's `CheckpointSaver` saves, so the recorded order always
    reaches the newest checkpoint.
    """

    def __init__(self, out_path: str | Path) -> None:
        self.out = Path(out_path)
        self._rows: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self._intervals: list[Any] = []
        self._order: Any = None  # the train DataOrder, when it skips steps

    # -- events --------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        from composer.callbacks import CheckpointSaver

        self._intervals = [
            cb.save_interval for cb in state.callbacks if isinstance(cb, CheckpointSaver)
        ]
        self._rows = []
        order = getattr(getattr(state.train_dataloader, "batch_sampler", None), "order", None)
        self._order = order if getattr(order, "skip_ranges", ()) else None
        if dist.get_global_rank() == 0:
            self.truncate(int(state.timestamp.batch))
            if self._order is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                ranges = [list(r) for r in self._order.skip_ranges]
                (self.out / SKIPPED).write_text(json.dumps({"skip_steps": ranges}) + "\n")
                log.info("order steps %s are skipped (recorded in %s)", ranges, self.out / SKIPPED)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch, ts = state.batch, state.timestamp
        step = int(ts.batch)
        if self._order is not None:
            order_step = self._order.next_step(int(ts.epoch), int(ts.batch_in_epoch))
        else:
            order_step = step
        self._rows.append((step, order_step, batch_sample_ids(batch), batch_epochs(batch)))

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.BATCH_CHECKPOINT):
            self.flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.EPOCH_CHECKPOINT):
            self.flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.flush()

    # -- work ----------------------------------------------------------------------------------

    def _due(self, state: State, event: Event) -> bool:
        # The same decision on every rank (it reads the synchronised timestamp only).
        return any(interval(state, event) for interval in self._intervals)

    def truncate(self, step: int) -> None:
        """Drop recorded rows with step >= `step` (a restart re-records them)."""
        if not self.out.exists():
            return
        import pyarrow.parquet as pq

        for part in sorted(self.out.glob("part-*.parquet")):
            m = _PART.match(part.name)
            if not m:
                continue
            first, last = int(m.group(1)), int(m.group(2))
            if first >= step:
                part.unlink()
            elif last >= step:
                table = pq.read_table(part)
                keep = table.filter(np.asarray(table.column("step").to_numpy()) < step)
                pq.write_table(keep, self.out / _part_name(first, step - 1))
                part.unlink()

    def flush(self) -> None:
        """Gather every rank's rows on rank 0 and append them as one Parquet part."""
        rows, self._rows = self._rows, []
        gathered = dist.all_gather_object(rows)
        if dist.get_global_rank() != 0:
            return
        by_step: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        order_steps: dict[int, int] = {}
        for rank_rows in gathered:  # rank order
            for step, order_step, ids, epochs in rank_rows:
                by_step.setdefault(step, []).append((ids, epochs))
                order_steps[step] = order_step
        if not by_step:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        steps = sorted(by_step)
        step_col, order_col, id_col, epoch_col = [], [], [], []
        for s in steps:
            ids = np.concatenate([i for i, _ in by_step[s]])
            step_col.append(np.full(len(ids), s, np.int64))
            order_col.append(np.full(len(ids), order_steps[s], np.int64))
            id_col.append(ids)
            epoch_col.append(np.concatenate([e for _, e in by_step[s]]))
        cols = {
            "step": np.concatenate(step_col),
            "sample_id": np.concatenate(id_col),
            "epoch": np.concatenate(epoch_col),
        }
        if self._order is not None:
            cols["order_step"] = np.concatenate(order_col)
        table = pa.table(cols)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / _part_name(steps[0], steps[-1])
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        log.debug("recorded steps %d-%d of the data order in %s", steps[0], steps[-1], path)
