"""A Composer logger that appends every logged metric as one JSON line (read by plots and reports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from composer.core import State
from composer.loggers import LoggerDestination
from composer.utils import dist


class JSONLLogger(LoggerDestination):
    """Writes `{"batch": k, "tokens": t, "<metric>": value, ...}` lines to a file on rank 0."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

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

    def fit_start(self, state: State, logger: Any) -> None:
        if dist.get_global_rank() == 0 and state.timestamp.batch.value == 0 and self.path.exists():
            self.path.unlink()  # a fresh run; a resumed run keeps appending
