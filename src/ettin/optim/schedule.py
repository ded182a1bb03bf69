"""The one LR schedule of the recipe: linear warm-up, constant, then a decay at the end.

`WarmupStableDecay` is a Composer scheduler (a callable `(state, ssr) -> multiplier of the peak
LR`). Progress is read from `state.timestamp` in the unit of each length, so a token-based run
(`max_duration: ...tok`) follows real, non-padding tokens. The reference's two schedules are
special cases:

| run | t_warmup | t_decay | alpha_f | decay_shape |
|---|---|---|---|---|
| phase 1 (warmup_stable_decay) | 2B-4B tok | 0tok | any | - |
| phase 2 (one_minus_sqrt) | 0tok | 1dur | 0.5 | 1-sqrt |
| phase 3 (one_minus_sqrt) | 0tok | 1dur | 0.04 | 1-sqrt |
| cross-objective | 3B tok | 10B tok | 0.02 | linear |
"""

from __future__ import annotations

import math
from typing import Any

from composer.core import Time, TimeUnit

from ettin.config import SchedulerConfig, run_time


class WarmupStableDecay:
    """LR multiplier: t/t_warmup during warm-up, 1.0, then a decay to `alpha_f` over the last `t_decay`.

    With x in [0, 1] the fraction of the decay window elapsed, the decay is `1 - x(1 - alpha_f)`
    (`linear`) or `alpha_f + (1 - alpha_f)(1 - sqrt(x))` (`1-sqrt`). Where warm-up and decay
    overlap the smaller multiplier wins. Lengths are Composer time strings ("3_000_000_000tok",
    "500ba", "1dur"); `t_decay` must be in the unit of `max_duration` or in `dur`. Warm-up starts
    at exactly 0 (the reference starts at 1e-10: the same to any precision that matters). Built
    from a validated `SchedulerConfig` (its checks live there, once).
    """

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.t_warmup = run_time(cfg.t_warmup, "scheduler.t_warmup")
        self.t_decay = run_time(cfg.t_decay, "scheduler.t_decay")
        self.alpha_f = cfg.alpha_f
        self.decay_shape = cfg.decay_shape

    @staticmethod
    def _absolute(time: Time, max_duration: Time, ssr: float) -> tuple[float, TimeUnit]:
        """(length, unit): `dur` becomes a fraction of max_duration; other units scale by ssr."""
        if time.unit == TimeUnit.DURATION:
            return float(time.value) * max_duration.value, max_duration.unit
        return float(time.value) * ssr, time.unit

    def __call__(self, state: Any, ssr: float = 1.0) -> float:
        max_duration = state.max_duration
        if max_duration is None:
            raise RuntimeError(
                "WarmupStableDecay needs state.max_duration (set max_duration on the Trainer)"
            )
        if max_duration.unit == TimeUnit.DURATION:
            raise ValueError("max_duration must be in tok, ba, sp or ep, not dur")

        warmup, warmup_unit = self._absolute(self.t_warmup, max_duration, ssr)
        warm = 1.0
        if warmup > 0:
            warm = min(1.0, state.timestamp.get(warmup_unit).value / warmup)

        decay, decay_unit = self._absolute(self.t_decay, max_duration, ssr)
        if decay <= 0:
            return warm
        if decay_unit != max_duration.unit:
            raise ValueError(
                f"scheduler.t_decay is in {decay_unit.value} but max_duration is in "
                f"{max_duration.unit.value}: give t_decay in the same unit or as a fraction ('1dur')"
            )
        now = state.timestamp.get(max_duration.unit).value
        x = (now - (max_duration.value - decay)) / decay
        x = min(max(x, 0.0), 1.0)
        if self.decay_shape == "linear":
            dec = 1.0 - x * (1.0 - self.alpha_f)
        else:
            dec = self.alpha_f + (1.0 - self.alpha_f) * (1.0 - math.sqrt(x))
        return min(warm, dec)

    def __repr__(self) -> str:
        return (
            f"WarmupStableDecay(t_warmup={self.t_warmup}, t_decay={self.t_decay}, "
            f"alpha_f={self.alpha_f}, decay_shape={self.decay_shape!r})"
        )
