"""Throughput in real (non-padding) tokens, model TFLOP/s per device, and MFU.

Composer's `SpeedMonitor` counts what the data spec reports and asks the model for
`flops_per_batch`; this callback reads the batch's `attention_mask` itself, so the numbers do not
depend on how the ComposerModel or the data spec are written, and it prices every sequence at
its own length (attention cost grows with it; packed rows hold several sequences).
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from ettin.flops import peak_flops


def sequence_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Lengths (B, S) of the sequences in a batch: entry [b, k-1] is the length of sequence k of row b.

    Follows the batch contract: 0 is padding and value k >= 1 marks the k-th sequence of a row.
    Absent sequence numbers give 0. Runs on the batch's device without a host sync.
    """
    rows, width = attention_mask.shape
    ids = attention_mask.long().clamp(min=0, max=width)
    offsets = torch.arange(rows, device=ids.device).unsqueeze(1) * (width + 1)
    counts = torch.bincount((ids + offsets).flatten(), minlength=rows * (width + 1))
    return counts.view(rows, width + 1)[:, 1:]


class Throughput(Callback):
    """Logs tokens/s, samples/s, model TFLOP/s per device and MFU, averaged over `window` batches.

    `flops_per_token_fn(seq_len)` gives the training FLOPs per token of a sequence of that length
    (e.g. `functools.partial(ettin.flops.flops_per_token, args, mlm_probability=p)`); without it
    only tokens and samples are logged. MFU is logged when the peak is known: `peak_flops_per_device`
    or, by default, `ettin.flops.peak_flops` of the training device (dense bf16). A sample is one
    sequence (a packed row counts once per sequence in it). The first batch (compilation, warm-up)
    and evaluation time are left out.

    Counting happens on the host batch (Composer hands `BATCH_END` the batch as the loader made
    it, before it moved to the device), so it costs no device sync; once per window the three
    totals move to the training device for the one `all_reduce` (NCCL refuses host tensors).

    Keys: throughput/{tokens,samples}_per_sec (all ranks), throughput/device/{tokens,samples}_per_sec,
    throughput/device/tflops_per_sec, throughput/device/mfu.
    """

    def __init__(
        self,
        window: int = 100,
        flops_per_token_fn: Callable[[int], float] | None = None,
        peak_flops_per_device: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"Throughput window must be >= 1, got {window}")
        self.window = window
        self.flops_per_token_fn = flops_per_token_fn
        self.peak = peak_flops_per_device
        self._table: torch.Tensor | None = None  # FLOPs of one whole sequence, by length
        self._start: float | None = None
        self._eval_start: float | None = None
        self._batches = 0
        self._totals: torch.Tensor | None = None  # [tokens, samples, flops] since _start

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger
        if self.peak is None:
            self.peak = peak_flops(_device_of(state))

    def _sequence_flops(self, width: int, device: torch.device) -> torch.Tensor:
        if self._table is None or self._table.numel() <= width or self._table.device != device:
            assert self.flops_per_token_fn is not None
            fn = self.flops_per_token_fn
            size = max(width, 2 * (self._table.numel() - 1)) if self._table is not None else width
            table = [0.0] + [length * fn(length) for length in range(1, size + 1)]
            self._table = torch.tensor(table, dtype=torch.float64, device=device)
        return self._table

    def batch_end(self, state: State, logger: Logger) -> None:
        now = perf_counter()
        mask = state.batch["attention_mask"] if isinstance(state.batch, dict) else None
        if mask is None:
            raise KeyError(
                "Throughput needs batches with an 'attention_mask' (docs/architecture.md, \"The batch\")"
            )
        if self._start is None:  # first batch: start the clock after it
            self._start, self._batches, self._totals = now, 0, None
            return

        lengths = sequence_lengths(mask)
        flops = (
            self._sequence_flops(mask.shape[1], mask.device)[lengths].sum()
            if self.flops_per_token_fn is not None
            else torch.zeros((), dtype=torch.float64, device=mask.device)
        )
        stats = torch.stack([lengths.sum().double(), (lengths > 0).sum().double(), flops])
        self._totals = stats if self._totals is None else self._totals + stats
        self._batches += 1
        if self._batches < self.window:
            return

        elapsed = now - self._start
        totals = state.device.tensor_to_device(self._totals)
        dist.all_reduce(totals, reduce_operation="SUM")
        tokens, samples, flops = totals.tolist()
        world = dist.get_world_size()
        metrics = {
            "throughput/tokens_per_sec": tokens / elapsed,
            "throughput/samples_per_sec": samples / elapsed,
            "throughput/device/tokens_per_sec": tokens / elapsed / world,
            "throughput/device/samples_per_sec": samples / elapsed / world,
        }
        if self.flops_per_token_fn is not None:
            device_flops = flops / elapsed / world
            metrics["throughput/device/tflops_per_sec"] = device_flops / 1e12
            if self.peak:
                metrics["throughput/device/mfu"] = device_flops / self.peak
        logger.log_metrics(metrics)
        self._start, self._batches, self._totals = now, 0, None

    def eval_start(self, state: State, logger: Logger) -> None:
        del state, logger
        self._eval_start = perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._eval_start is not None and self._start is not None:
            self._start += perf_counter() - self._eval_start
        self._eval_start = None


def _device_of(state: State) -> torch.device | None:
    for p in state.model.parameters():
        return p.device
    return None
