"""Samples -> a batch dict (docs/architecture.md, "The batch"): pad-to-longest, or packing, plus MLM masks.

Input items are `(sample_id, mask_epoch, ids)` as produced by the loader's dataset. Masks are
drawn per sequence before padding or packing (`ettin.objectives.mlm_mask_batch`), so they never
depend on how sequences share a row.

Packing places whole sequences into rows of at most `max_seq_len` tokens by best-fit
decreasing (longest first, each into the fullest row that still has room; ties by position),
which is deterministic and never splits a sequence. Every sequence of the device batch is
placed, so a step consumes exactly its planned samples (nothing is carried over or re-queued).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ettin.objectives import IGNORE_INDEX, mlm_mask_batch


@dataclass(frozen=True)
class MaskSpec:
    """What MLM masking needs (see `ettin.objectives.mlm_mask_batch`)."""

    p: float
    seed: int
    mask_id: int
    special_ids: np.ndarray
    ordinary_ids: np.ndarray


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins: lists of item positions whose lengths sum to <= capacity."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def packing_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens / cells of the batch (1.0 = no padding)."""
    mask = batch["attention_mask"]
    return float((mask > 0).sum()) / max(mask.numel(), 1)


@dataclass
class Collator:
    """Turns a list of `(sample_id, mask_epoch, ids)` into a batch (docs/architecture.md,
    "The batch")."""

    pad_id: int
    max_seq_len: int
    packing: bool = False
    mlm: MaskSpec | None = None

    def __call__(self, items: Sequence[tuple[int, int, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        sids = np.asarray([s for s, _, _ in items], np.int64)
        epochs = np.asarray([e for _, e, _ in items], np.int64)
        if self.mlm is None:
            seqs = [(ids, None) for _, _, ids in items]
        else:
            m = self.mlm
            seqs = mlm_mask_batch(
                [ids for _, _, ids in items],
                sample_ids=sids,
                epochs=epochs,
                seed=m.seed,
                p=m.p,
                mask_id=m.mask_id,
                special_ids=m.special_ids,
                ordinary_ids=m.ordinary_ids,
            )
        if self.packing:
            return self._packed(seqs, sids, epochs)
        return self._padded(seqs, sids, epochs)

    def _padded(self, seqs, sids: np.ndarray, epochs: np.ndarray) -> dict[str, torch.Tensor]:
        width = max(len(x) for x, _ in seqs)
        b = len(seqs)
        input_ids = np.full((b, width), self.pad_id, np.int64)
        attention = np.zeros((b, width), np.int64)
        labels = np.full((b, width), IGNORE_INDEX, np.int64) if self.mlm else None
        for r, (x, y) in enumerate(seqs):
            input_ids[r, : len(x)] = x
            attention[r, : len(x)] = 1
            if labels is not None:
                labels[r, : len(x)] = y
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "sample_id": torch.from_numpy(sids),
            "epoch": torch.from_numpy(epochs),
        }
        if labels is not None:
            out["labels"] = torch.from_numpy(labels)
        return out

    def _packed(self, seqs, sids: np.ndarray, epochs: np.ndarray) -> dict[str, torch.Tensor]:
        rows = pack([len(x) for x, _ in seqs], self.max_seq_len)
        width = max(sum(len(seqs[i][0]) for i in row) for row in rows)
        k = max(len(row) for row in rows)
        n = len(rows)
        input_ids = np.full((n, width), self.pad_id, np.int64)
        attention = np.zeros((n, width), np.int64)
        labels = np.full((n, width), IGNORE_INDEX, np.int64) if self.mlm else None
        row_ids = np.full((n, k), -1, np.int64)
        for r, row in enumerate(rows):
            pos = 0
            for seg, i in enumerate(row):
                x, y = seqs[i]
                input_ids[r, pos : pos + len(x)] = x
                attention[r, pos : pos + len(x)] = seg + 1
                if labels is not None:
                    labels[r, pos : pos + len(x)] = y
                row_ids[r, seg] = sids[i]
                pos += len(x)
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "sample_id": torch.full((n,), -1, dtype=torch.long),
            "sample_ids": torch.from_numpy(row_ids),
            "epoch": torch.as_tensor([int(epochs[row[0]]) for row in rows], dtype=torch.long),
        }
        if labels is not None:
            out["labels"] = torch.from_numpy(labels)
        return out


def batch_sample_ids(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Sample ids in a (device) batch: row order for padded batches, row-major for packed ones."""
    if "sample_ids" in batch:
        ids = batch["sample_ids"].reshape(-1)
        return ids[ids >= 0].cpu().numpy().astype(np.int64)
    return batch["sample_id"].cpu().numpy().astype(np.int64)


def batch_epochs(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Mask epoch of each sample, aligned with `batch_sample_ids`."""
    if "sample_ids" in batch:
        ids = batch["sample_ids"]
        ep = batch["epoch"].reshape(-1, 1).expand_as(ids)
        return ep[ids >= 0].cpu().numpy().astype(np.int64)
    return batch["epoch"].cpu().numpy().astype(np.int64)
