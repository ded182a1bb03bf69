"""A Composer logger that appends every logged metric as one JSON line (read by plots and reports)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from composer.core import State
from composer.loggers import LoggerDestination
from composer.utils import dist

log = logging.getLogger(__name__)


class JSONLLogger(LoggerDestination):
    """Writes `{"batch": k, "tokens": t, "<metric>": value, ...}` lines to a file on rank 0.

    Each line is written (and the file closed) when it is logged, so at a checkpoint the file's
    length is exactly what was logged before it. That length goes into the checkpoint
    (`state_dict`); a run resumed from it cuts the file back to that length before training,
    so the rows of the steps between the checkpoint and a crash are not kept twice: after a
    resume the file holds each step once, as an uninterrupted run writes it.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._resume_bytes: int | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if dist.get_global_rank() != 0:
            return
        row: dict[str, Any] = {"batch": step}
        for key, value in metrics.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def state_dict(self) -> dict[str, Any]:
        size = self.path.stat().st_size if self.path.exists() else 0
        return {"bytes": size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_bytes = state.get("bytes") if isinstance(state, dict) else None

    def fit_start(self, state: State, logger: Any) -> None:
        if dist.get_global_rank() != 0 or not self.path.exists():
            return
        if state.timestamp.batch.value == 0:
            self.path.unlink()  # a fresh run
            return
        keep = self._resume_bytes
        if keep is not None and self.path.stat().st_size > keep:
            # Rows logged after the checkpoint this run resumes from; the run logs them again.
            with self.path.open("r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            log.info("%s: dropped rows logged after the resumed checkpoint", self.path)
