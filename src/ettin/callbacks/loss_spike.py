"""Loss-spike / NaN guard, and saving the untrained model (step 0) as a checkpoint.

`LossSpikeGuard(window, ratio, action, run_dir)` watches the training loss Composer logs at
`Event.BATCH_END` (`state.total_loss_dict["loss/train/total"]`: already averaged over the ranks,
so every rank sees the same number and takes the same decision without communication). A
non-finite loss, or one above `ratio` x the median of the previous `window` step losses (once
`window` of them are known), triggers the action:

- `stop`: `state.stop_training()`. Composer's CheckpointSaver then saves this batch as it saves
  the end of any run, so the run has a complete, resumable checkpoint at the spike. For a NaN/inf
  loss the weights after that step are not trustworthy, so nothing is saved (the newest
  checkpoint stays the one before).
- `rewind`: the offending step is added to `<run_dir>/skip_steps.json` (`ettin.data.skips`,
  which owns that file), the run stops without saving (the post-spike weights never become a
  checkpoint), and rerunning the same command resumes from the newest checkpoint, before the
  spike: the run folder's skip file is read on every (re)start, so the data order leaves the
  recorded step out with no change to the command. `ettin order export` with the same config
  lists the order the rerun trains on. Refused with `data.order=streaming` (no order steps to
  skip) when the config is read.

Either way the final HF export is skipped, `DONE` is not written and `ettin train` exits with an
error that says what happened (`ettin.train` raises `LossSpikeError`), so a recipe chain does not
go on from a run that did not finish. `<run_dir>/loss_spike.json` records every trigger.

The step recorded is the global order step (that of `ettin order export`): the run's 0-based
step, i.e. the metrics' `batch` of the spike, when nothing was skipped before it; after earlier
skips it is mapped through the order's kept steps.

`SaveStep0`: at `Event.FIT_START` of a fresh run (batch 0, no batch-0 checkpoint yet), calls the
trainer's CheckpointSaver so `ep0-ba0-rank0.pt` is written like every other checkpoint (complete,
in the saver's list, `latest` pointing at it until the next save); resuming from it is a normal
resume at batch 0.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from ettin.data.skips import SKIP_FILE, add_skip
from ettin.errors import UserError

log = logging.getLogger(__name__)

EVENTS_FILE = "loss_spike.json"
ACTIONS = ("stop", "rewind")


class LossSpikeError(UserError):
    """The run was stopped by the loss-spike guard (the message says why and what to do)."""


class LossSpikeGuard(Callback):
    """Stops a run at a NaN/inf loss or a loss above `ratio` x the running median (see module)."""

    def __init__(self, window: int, ratio: float, action: str, run_dir: str | Path) -> None:
        if window <= 0:
            raise ValueError(f"LossSpikeGuard window must be positive, got {window}")
        if action not in ACTIONS:
            raise ValueError(f"loss_spike_action={action!r} is not one of {', '.join(ACTIONS)}")
        self.window, self.ratio, self.action = int(window), float(ratio), action
        self.run_dir = Path(run_dir)
        self.recent: deque[float] = deque(maxlen=self.window)
        self.triggered: dict[str, Any] | None = None

    # The recent losses travel with the checkpoints, so a resumed run decides as an
    # uninterrupted one would.
    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=self.window)

    def check(self, loss: float) -> str | None:
        """Why `loss` is a spike (None if it is not); otherwise it joins the window."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if len(self.recent) == self.window:
            median = statistics.median(self.recent)
            if loss > self.ratio * median:
                return (
                    f"loss {loss:.4g} > {self.ratio:g} x the median {median:.4g} of the last "
                    f"{self.window} steps"
                )
        self.recent.append(loss)
        return None

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = getattr(state, "total_loss_dict", None) or {}
        if "loss/train/total" not in losses:
            return
        loss = float(losses["loss/train/total"])
        reason = self.check(loss)
        if reason is None:
            return
        batch = int(state.timestamp.batch)  # steps done, this one included
        step = _order_step(state, batch)  # the offending step in the data order's numbering
        finite = math.isfinite(loss)
        save = self.action == "stop" and finite
        event = {
            "step": step,
            "batch": batch,
            "loss": loss if finite else str(loss),
            "reason": reason,
            "action": self.action,
            "saved": save,
        }
        self.triggered = event
        if dist.get_global_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            events = self.run_dir / EVENTS_FILE
            past = json.loads(events.read_text()) if events.is_file() else []
            events.write_text(json.dumps([*past, event], indent=2) + "\n")
            if self.action == "rewind":
                add_skip(self.run_dir, step, step + 1, event)
        logger.log_metrics({"loss_spike/step": step})
        log.warning("loss-spike guard at step %d: %s (%s)", step, reason, self.action)
        state.stop_training()
        for cb in state.callbacks:
            name = type(cb).__name__
            if name == "CheckpointSaver" and not save:
                # No checkpoint of the post-spike weights: the newest one stays the one before.
                cb.save_interval = lambda state, event: False
            elif name == "HFExport":
                cb.fit_end = lambda state, logger: None  # the run did not finish: no final export

    def message(self) -> str:
        """What happened and what to do (for the error `ettin train` ends with)."""
        e = self.triggered or {}
        head = f"loss-spike guard stopped the run at step {e.get('step')} ({e.get('reason')})"
        if e.get("action") == "rewind":
            return (
                f"{head}; step recorded in {self.run_dir / SKIP_FILE}. Rerun the same command to "
                "resume from the last checkpoint without that step (the run folder's skip file "
                "is read on every restart)"
            )
        if e.get("saved"):
            return (
                f"{head}; a checkpoint of batch {e.get('batch')} was saved. Rerun to go on from "
                "it (e.g. with a lower optim.lr), or use loss_spike_action=rewind to skip the step"
            )
        return (
            f"{head}; nothing was saved (the weights after a non-finite loss are not usable). "
            "Rerun to resume from the last checkpoint, or use loss_spike_action=rewind"
        )


def _order_step(state: State, batch: int) -> int:
    """The global data-order step of the run's step `batch - 1` (earlier skips accounted for)."""
    try:
        order = state.train_dataloader.dataset.sampler.order  # ettin.data.loader.TrainDataset
        epoch = int(state.timestamp.epoch)
        in_epoch = int(state.timestamp.batch_in_epoch) - 1
        return int(order.global_step(int(order.kept(epoch)[in_epoch]), epoch))
    except (AttributeError, IndexError, TypeError):
        return batch - 1  # no ettin order (or a fake state): the run's own 0-based step


class SaveStep0(Callback):
    """Saves the untrained model as the batch-0 checkpoint at FIT_START (see module docstring)."""

    def fit_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != 0:
            return  # a resumed run: its step-0 checkpoint (if any) is already there
        savers = [cb for cb in state.callbacks if type(cb).__name__ == "CheckpointSaver"]
        if not savers:
            return
        if len(savers) > 1:  # the run builder adds one: more is a bug, not a user's mistake
            raise RuntimeError(f"SaveStep0 found {len(savers)} CheckpointSavers, expected one")
        saver = savers[0]
        from ettin.checkpoint import run_checkpoints

        folder = Path(str(saver.folder).replace("{run_name}", state.run_name))
        if any(p.name.startswith("ep0-ba0-") for p in run_checkpoints(folder)):
            return
        saver._save_checkpoint(state, logger)  # the saver's own naming, symlink and bookkeeping
