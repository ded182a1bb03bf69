"""Record the sample ids each optimiser step actually consumed, as a replayable order.

`DataOrderRecorder(out_path)` keeps, on every rank, the ids of each device batch it trains on
(`after_dataloader`; skipped batches are never seen). At every checkpoint and at the end of
`fit`, the ranks' lists are gathered on rank 0 and appended to `out_path`, a folder of Parquet
parts `part-<first step>-<last step>.parquet` with columns `step`, `sample_id`, `epoch` (the
mask epoch): the same columns as `ettin order export`, so `ettin order audit` and
`data.order_file=` read it directly (`ettin.data.order.read_order`).

Resumption never duplicates steps: when `fit` starts at step k, rank 0 drops every recorded row
with step >= k (rows written after the checkpoint the run resumes from), and the resumed run
writes them again. Rows of a step are in rank order, each rank's rows in batch order, so for
padded batches a step's rows are exactly the planned global batch; packed rows are recorded
row by row (same samples, packing order).
"""

from __future__ import annotations

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


def _part_name(first: int, last: int) -> str:
    return f"part-{first:010d}-{last:010d}.parquet"


class DataOrderRecorder(Callback):
    """Write the consumed order to `out_path/` (Parquet parts) at checkpoints and at fit end.

    `save_interval` (a Composer time string) sets when to write; by default the recorder
    writes whenever the trainer's `CheckpointSaver` saves, so the recorded order always
    reaches the newest checkpoint.
    """

    def __init__(self, out_path: str | Path, save_interval: str | None = None) -> None:
        self.out = Path(out_path)
        self._rows: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._intervals: list[Any] = []
        if save_interval is not None:
            from composer.utils.misc import create_interval_scheduler

            self._intervals = [create_interval_scheduler(save_interval)]

    # -- events --------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        if not self._intervals:
            from composer.callbacks import CheckpointSaver

            self._intervals = [
                cb.save_interval for cb in state.callbacks if isinstance(cb, CheckpointSaver)
            ]
        self._rows = []
        if dist.get_global_rank() == 0:
            self.truncate(int(state.timestamp.batch))

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        self._rows.append(
            (int(state.timestamp.batch), batch_sample_ids(batch), batch_epochs(batch))
        )

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
        for rank_rows in gathered:  # rank order
            for step, ids, epochs in rank_rows:
                by_step.setdefault(step, []).append((ids, epochs))
        if not by_step:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        steps = sorted(by_step)
        step_col, id_col, epoch_col = [], [], []
        for s in steps:
            ids = np.concatenate([i for i, _ in by_step[s]])
            step_col.append(np.full(len(ids), s, np.int64))
            id_col.append(ids)
            epoch_col.append(np.concatenate([e for _, e in by_step[s]]))
        table = pa.table(
            {
                "step": np.concatenate(step_col),
                "sample_id": np.concatenate(id_col),
                "epoch": np.concatenate(epoch_col),
            }
        )
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / _part_name(steps[0], steps[-1])
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        log.debug("recorded steps %d-%d of the data order in %s", steps[0], steps[-1], path)
