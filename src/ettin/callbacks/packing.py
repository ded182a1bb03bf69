"""Fraction of the device batch's cells that hold real tokens."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger

from ettin.data.collate import packing_efficiency


class PackingEfficiency(Callback):
    """Every `interval` batches (from the first), logs trainer/packing_efficiency of the device batch.

    With pad-to-longest this is the non-padding fraction; with packing, how full the rows are.
    `interval=0` disables the callback.
    """

    def __init__(self, interval: int = 100) -> None:
        if interval < 0:
            raise ValueError(f"PackingEfficiency interval must be >= 0, got {interval}")
        self.interval = interval

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.interval == 0 or int(state.timestamp.batch) % self.interval != 0:
            return
        logger.log_metrics({"trainer/packing_efficiency": packing_efficiency(state.batch)})
