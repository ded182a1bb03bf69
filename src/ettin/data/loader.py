"""The Composer `DataSpec` of a split: dataset + order-driven batch sampler + collator.

Training: the batch sampler yields, for each step of the epoch, this rank's contiguous slice
of the global batch given by `ettin.data.order.DataOrder`. Evaluation: a fixed order (sample
0..N-1), fixed masks (epoch 0, `eval_mlm_probability`), every sample exactly once
(drop_last=False), each global batch split contiguously across ranks.

Resumption (Composer 0.32.1). Composer saves `dataset.state_dict(sample_in_epoch, True)` in
every checkpoint when the train dataset has `state_dict`, and on load calls
`dataset.load_state_dict(...)` and marks the train data as self-resuming, which turns off its
own batch skipping (`spin_dataloaders` only skips when no dataset state was restored; the run
builder passes `spin_dataloaders=False`, which skips nothing at all). `TrainDataset` uses
that hook: `sample_in_epoch` (all ranks) is turned back into the step inside the epoch, and
the sampler starts there, so no skipped batch is ever loaded and the batches after a restart
at step k are exactly those of an uninterrupted run, for any world size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ettin.data.collate import Collator, MaskSpec
from ettin.data.dataset import SampleRules, TokenDataset
from ettin.data.order import DataOrder, order_for_run, rank_slice
from ettin.data.replay import check_fits, open_train_data
from ettin.data.shards import DataError
from ettin.objectives import num_loss_tokens, token_sets

log = logging.getLogger(__name__)

Key = tuple[int, int]
"""What the samplers yield per sample: (global sample id, mask epoch)."""


class KeyedDataset(Dataset):
    """`ds[(i, mask_epoch)] -> (sample_id, mask_epoch, ids)` over a TokenDataset (i is the
    sample id) or the tokens of an order file (i is the row; `OrderTokens` gives the id)."""

    def __init__(self, base: TokenDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Key) -> tuple[int, int, np.ndarray]:
        i, epoch = key
        sid, ids = self.base[i]
        return sid, epoch, ids


class OrderSampler(DistributedSampler):
    """Batch sampler of the training order: this rank's slice of each global batch.

    A `DistributedSampler` subclass only so that Composer recognises it (it calls `set_epoch`
    on it each epoch and accepts it for world_size > 1); it yields lists of `(sample_id,
    mask_epoch)` keys for the kept steps of the epoch (`DataOrder.kept`: skip ranges removed).
    `start_at(j)` makes the next pass over the epoch begin at its j-th kept step.
    """

    def __init__(self, dataset: Dataset, order: DataOrder, *, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        self.order = order
        self.epoch = 0
        self._start: tuple[int | None, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def rank_batch_size(self) -> int:
        """This rank's samples per step at the full global batch size."""
        full = (
            self.order.schedule.full
            if self.order.replay is None
            else int(np.diff(self.order.replay.bounds).max())
        )
        return -(-full // self.num_replicas)

    def __len__(self) -> int:
        return len(self.order.kept(self.epoch))

    def start_at(self, step_in_epoch: int, epoch: int | None = None) -> None:
        """Begin the next pass at the kept step `step_in_epoch` (of `epoch`, checked if given)."""
        self._start = (epoch, int(step_in_epoch))

    def batch(self, k: int, epoch: int | None = None) -> list[Key]:
        """This rank's keys of step `k` of `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        ids = rank_slice(self.order.global_batch(k, epoch), self.rank, self.num_replicas)
        eps = rank_slice(self.order.mask_epochs(k, epoch), self.rank, self.num_replicas)
        return list(zip(ids.tolist(), eps.tolist()))

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, first = self.epoch, 0
        if self._start is not None:
            want, first = self._start
            self._start = None
            if want is not None and want != epoch:
                raise DataError(
                    f"resumption expected epoch {want} but the trainer is at epoch {epoch}; "
                    f"the checkpoint and the data order disagree"
                )
        for k in self.order.kept(epoch)[first:].tolist():
            yield self.batch(k, epoch)


class TrainDataset(KeyedDataset):
    """The training dataset, with the Composer state hooks that make resumption exact."""

    def __init__(self, base: TokenDataset, sampler: OrderSampler | None = None) -> None:
        super().__init__(base)
        self.sampler = sampler

    def _identity(self) -> dict:
        order = self.sampler.order
        return {
            "num_samples": len(self.base),
            "seed": order.seed,
            "global_batch_size": order.schedule.full,
            "replay": order.replay.source if order.replay is not None else None,
        }

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict:
        """Where training is inside the epoch (Composer passes `timestamp.sample_in_epoch`),
        and the order step it trains next (so skip ranges added later resume exactly)."""
        order, epoch = self.sampler.order, self.sampler.epoch
        state = {
            "version": 1,
            "epoch": epoch,
            "sample_in_epoch": int(num_samples),
            "skip_steps": [list(r) for r in order.skip_ranges],
            **self._identity(),
        }
        try:
            state["next_step"] = order.next_step(epoch, order.step_at_sample(epoch, num_samples))
        except DataError:  # not a step boundary: resuming from it fails with the same error
            pass
        return state

    def load_state_dict(self, obj: dict | None) -> None:
        """Make the sampler start at the step the checkpoint stopped at."""
        if not obj:
            return
        now = self._identity()
        changed = [k for k in ("num_samples", "seed") if obj.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k}: checkpoint {obj.get(k)!r}, now {now[k]!r}" for k in changed)
            raise DataError(
                f"cannot resume with a different data order ({diffs}); restore the phase's data and "
                f"data.shuffle_seed, or start the phase again (init_from=...)"
            )
        n = int(obj.get("sample_in_epoch", 0))
        if n == 0:
            return
        epoch, order = int(obj["epoch"]), self.sampler.order
        if obj.get("next_step") is not None:
            k = order.resume_index(epoch, n, int(obj["next_step"]))
        else:  # checkpoints written before next_step was recorded
            k = order.step_at_sample(epoch, n)
        log.info(
            "resuming the data order at epoch %d, kept step %d of the epoch (%d samples in; "
            "next order step %d)",
            epoch,
            k,
            n,
            order.next_step(epoch, k),
        )
        self.sampler.start_at(k, epoch)


class EvalSampler(DistributedSampler):
    """Fixed evaluation batches: 0..N-1 in global batches, split contiguously over ranks.

    A last batch with fewer samples than ranks is merged into the one before, so every rank
    gets at least one sample per batch and no sample is duplicated.
    """

    def __init__(
        self, dataset: Dataset, global_batch_size: int, *, rank: int, world_size: int
    ) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
        )
        n = len(dataset)
        if n < world_size:
            raise DataError(
                f"the evaluation split has {n} samples, fewer than the {world_size} ranks"
            )
        bounds = list(range(0, n, global_batch_size)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < world_size:
            bounds.pop(-2)
        self.bounds = bounds
        # Nothing is padded. Composer's eval loop takes `total_size - len(dataset)` as the number
        # of padding samples to drop from the last batch (DistributedSampler pads to W x ceil);
        # left at DistributedSampler's value it would drop real samples.
        self.total_size = n

    def set_epoch(self, epoch: int) -> None:  # the evaluation order never changes
        pass

    @property
    def rank_batch_size(self) -> int:
        """The most samples this sampler gives a rank in one batch."""
        return max(
            -(-(hi - lo) // self.num_replicas) for lo, hi in zip(self.bounds[:-1], self.bounds[1:])
        )

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __iter__(self) -> Iterator[list[Key]]:
        for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
            ids = rank_slice(np.arange(lo, hi), self.rank, self.num_replicas)
            yield [(int(i), 0) for i in ids]


class BatchLoader(DataLoader):
    """A DataLoader over a batch sampler that still reports this rank's (largest) batch size.

    With `batch_sampler=` torch sets `batch_size` to None, but Composer reads
    `dataloader.batch_size` (the default `device_eval_microbatch_size`, checkpoint metadata).
    """

    rank_batch_size: int | None = None

    @property
    def batch_size(self) -> int | None:  # type: ignore[override]
        return self.rank_batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        pass  # DataLoader.__init__ assigns None here; the real value is rank_batch_size


def num_samples_in_batch(batch: dict[str, torch.Tensor]) -> int:
    """Sequences in a batch (packed rows hold several)."""
    if "sample_ids" in batch:
        return int((batch["sample_ids"] >= 0).sum())
    return int(batch["input_ids"].shape[0])


def token_counter(objective: str):
    """`get_num_tokens_in_batch` for Composer: real tokens ('total') and loss tokens."""

    def count(batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {
            "total": int((batch["attention_mask"] > 0).sum()),
            "loss_generating": num_loss_tokens(batch, objective),
        }

    return count


def build_dataloader(
    data_cfg: Any,
    objective_cfg: Any,
    tokenizer: Any,
    *,
    split: str,
    global_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    microbatch_size: int,
    epoch_offset: int = 0,
    run_dir: str | Path | None = None,
):
    """The `composer.core.DataSpec` of one split for this rank.

    The split `data_cfg.train_split` trains, any other evaluates. `seed` seeds the MLM masks
    (`data_cfg.shuffle_seed` seeds the order). `epoch_offset` shifts the mask epoch of
    `data.order=streaming`. Training follows `ettin.data.order.order_for_run`: it skips
    `data.skip_steps` and the ranges of `<run_dir>/skip_steps.json`. Token counts exclude padding;
    the 'loss_generating' count feeds Composer's `accumulate_train_batch_on_tokens`.
    """
    from composer.core import DataSpec

    train = split == data_cfg.train_split
    objective = objective_cfg.name
    encoder = objective == "mlm"
    rules = SampleRules.from_tokenizer(tokenizer, max_seq_len=data_cfg.max_seq_len, encoder=encoder)
    streaming = train and getattr(data_cfg, "order", "global") == "streaming"
    replay = None
    if streaming:
        base = None  # data.order=streaming: shards arrive on demand (ettin.data.streaming)
    elif train:  # the shards, or an order file that holds the tokens (ettin.data.replay)
        base, replay = open_train_data(data_cfg, rules, tokenizer)
    else:
        base = TokenDataset(
            data_cfg.path, split, rules, tokenizer=tokenizer, local_cache=data_cfg.local_cache
        )

    mlm = None
    if encoder:
        if tokenizer.mask_token_id is None:
            raise DataError("MLM needs a tokenizer with a [MASK] token")
        special, ordinary = token_sets(tokenizer)
        p = objective_cfg.mlm_probability if train else objective_cfg.eval_mlm_probability
        mlm = MaskSpec(
            p=p,
            seed=seed,
            mask_id=tokenizer.mask_token_id,
            special_ids=special,
            ordinary_ids=ordinary,
        )
    collator = Collator(
        pad_id=rules.pad_id, max_seq_len=data_cfg.max_seq_len, packing=data_cfg.packing, mlm=mlm
    )

    if train:
        if global_batch_size % world_size:
            raise DataError(
                f"global batch size {global_batch_size} is not divisible by {world_size} ranks"
            )
        if streaming:
            from ettin.data.streaming import build_streaming_train

            return build_streaming_train(
                data_cfg,
                rules,
                tokenizer,
                collator,
                split=split,
                global_batch_size=global_batch_size,
                world_size=world_size,
                epoch_offset=epoch_offset,
                num_samples_in_batch=num_samples_in_batch,
                get_num_tokens_in_batch=token_counter(objective),
            )
        order = order_for_run(
            data_cfg, len(base), global_batch_size=global_batch_size, replay=replay, run_dir=run_dir
        )
        if replay is not None and replay.has_tokens:
            check_fits(replay, order.schedule, data_cfg.max_seq_len, rules.vocab_size)
        _check_rank_sizes(order, world_size, microbatch_size)
        dataset: Dataset = TrainDataset(base)
        sampler: DistributedSampler = OrderSampler(dataset, order, rank=rank, world_size=world_size)
        dataset.sampler = sampler
    else:
        dataset = KeyedDataset(base)
        sampler = EvalSampler(dataset, global_batch_size, rank=rank, world_size=world_size)

    workers = data_cfg.num_workers
    loader = BatchLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    loader.rank_batch_size = sampler.rank_batch_size
    return DataSpec(
        loader,
        num_samples=len(base),
        get_num_samples_in_batch=num_samples_in_batch,
        get_num_tokens_in_batch=token_counter(objective),
    )


def _check_rank_sizes(order: DataOrder, world_size: int, microbatch_size: int) -> None:
    """Every step must give every rank at least one sample (equal shares when W divides it)."""
    sched = order.schedule
    if order.replay is not None:
        sizes = np.diff(order.replay.bounds)
        if (sizes < world_size).any():
            bad = int(np.argmax(sizes < world_size))
            raise DataError(
                f"{order.replay.source}: step {order.replay.first_step + bad} has {int(sizes[bad])} "
                f"samples, fewer than the {world_size} ranks"
            )
        return
    if sched.warmup_samples and sched.min_size % world_size:
        raise DataError(
            f"data.batch_size_warmup_min={sched.min_size} must be a multiple of the {world_size} ranks "
            f"(every warm-up size is a multiple of it)"
        )
    if sched.warmup_samples and (sched.min_size // world_size) % microbatch_size:
        log.info(
            "batch-size warm-up: %d sequences per rank at the smallest size is not a multiple of the "
            "microbatch (%d); the last microbatch of those steps is smaller",
            sched.min_size // world_size,
            microbatch_size,
        )
