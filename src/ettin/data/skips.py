"""Skip ranges: the order steps a run never trains on, and the run folder's `skip_steps.json`.

A range `[a, b]` drops the order steps `a <= step < b` (end excluded): the global `step` of
`ettin order export` and of an order file, which is what `ettin.data.order.DataOrder` numbers.
A run's ranges are `data.skip_steps` merged with `<run_dir>/skip_steps.json`
(`run_skips`); `ettin.data.order.order_for_run` applies them, for training and for
`ettin order export` alike, so the export lists what the run trains on.

**skip_steps.json** (`SKIP_FILE`): `{"skip_steps": [[a, b], ...], "events": [...]}` (a plain
list `[[a, b], ...]` is read too). The loss-spike guard's rewind (`ettin.callbacks.loss_spike`)
adds the offending step with `add_skip`; the file is read on every (re)start of the run, so
rerunning the same command resumes from the newest checkpoint without that step. Ranges are
checked, sorted and merged (`merge`); `add_skip` only adds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ettin.data.shards import DataError

SKIP_FILE = "skip_steps.json"
"""The skip file of a run folder."""

Ranges = tuple[tuple[int, int], ...]
"""Checked, sorted, merged half-open step ranges."""


def merge(ranges: Iterable | None, where: str = "data.skip_steps") -> Ranges:
    """`[[a, b], ...]` checked (0 <= a < b), sorted, and merged where they overlap or touch."""
    out: list[list[int]] = []
    for r in ranges or ():
        try:
            a, b = (int(x) for x in r)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: {r!r} is not a range [first, end] of steps (end excluded)"
            ) from None
        if not 0 <= a < b:
            raise DataError(
                f"{where}: [{a}, {b}] is empty or negative; a range [a, b] skips the steps "
                f"a <= step < b, so it needs 0 <= a < b"
            )
        out.append([a, b])
    merged: list[list[int]] = []
    for a, b in sorted(out):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return tuple((a, b) for a, b in merged)


def _read(path: Path) -> dict[str, Any]:
    """The skip file as {"skip_steps": [...], ...} ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not JSON ({err}); it must hold a list of [a, b] step ranges: fix or "
            "delete it"
        ) from err
    obj = {"skip_steps": obj} if isinstance(obj, list) else obj
    if not isinstance(obj, dict) or not isinstance(obj.get("skip_steps", []), list):
        raise DataError(f"{path} must hold a list of [a, b] step ranges under 'skip_steps'")
    return obj


def read_skip_file(run_dir: str | Path) -> Ranges:
    """The ranges of `<run_dir>/skip_steps.json` (none when the file does not exist)."""
    path = Path(run_dir) / SKIP_FILE
    return merge(_read(path).get("skip_steps", []), where=str(path))


def run_skips(config_ranges: Iterable | None, run_dir: str | Path | None) -> Ranges:
    """A run's skip ranges: `data.skip_steps` merged with its folder's skip file (if any)."""
    extra = read_skip_file(run_dir) if run_dir is not None else ()
    return merge([*merge(config_ranges), *extra])


def add_skip(run_dir: str | Path, first: int, end: int, event: dict[str, Any]) -> Path:
    """Add the steps `first <= step < end` (merged) and `event` to `<run_dir>/skip_steps.json`."""
    path = Path(run_dir) / SKIP_FILE
    data = _read(path)
    ranges = merge([*data.get("skip_steps", []), [first, end]], where=str(path))
    data["skip_steps"] = [list(r) for r in ranges]
    data.setdefault("events", []).append(event)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
