"""`data.order=streaming`: train on a split that need not fit on the node, with Streaming's order.

The reference order (`ettin.data.order`, `data.order=global`) is a permutation of the whole
split, so its first steps already touch every shard: the split must be local before step 1.
This path hands the order to mosaicml-streaming instead: `StreamingDataset(shuffle=True,
shuffle_algo=data.shuffle_algo, shuffle_seed=data.shuffle_seed, shuffle_block_size=...,
num_canonical_nodes=data.num_canonical_nodes)` downloads shards on demand (a few ahead), keeps
at most `data.cache_limit` bytes of them in `data.local_cache` (evicting the coldest), and its
order depends only on the seed, the algorithm, the block size and the canonical nodes, not on
the number of ranks ("elastic"): with the same `num_canonical_nodes`, 1 rank and 2 ranks train on
the same global batches. Resumption is Streaming's own: Composer stores
`dataset.state_dict(sample_in_epoch, True)` in each checkpoint and hands it back on load, and the
dataset starts at that sample.

What stays as in the global order: each item is `(global sample id, mask epoch, ids)` with the
sample rules applied (`SampleRules`), the global id being the sample's index in index.json shard
order (Streaming's sample index, the same as `TokenDataset`'s), so MLM masks, the collator
(padding or packing) and the order recorder work unchanged. The tokenizer is checked against
meta.json when the phase has one; without it every sample must start with the tokenizer's [CLS]
(the loader's first-token check, here per sample since the shards arrive during training).
Downloaded shards are checked by Streaming against index.json's hash (`validate_hash`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ettin.config import parse_bytes
from ettin.data.dataset import SampleRules
from ettin.data.shards import (
    INDEX,
    INPUT_IDS,
    META,
    PREFERRED_HASHES,
    DataError,
    check_tokenizer,
    is_remote,
    local_path,
    read_index,
    read_meta,
)

log = logging.getLogger(__name__)


def _hash_algo(index: dict) -> str | None:
    """The fastest content hash index.json records for every shard that Streaming can check."""
    from streaming.base.hashing import get_hashes

    usable = get_hashes()
    recorded = None
    for shard in index["shards"]:
        data = shard.get("zip_data") or shard["raw_data"]
        have = set((data.get("hashes") or {}).keys())
        recorded = have if recorded is None else recorded & have
    return next((a for a in PREFERRED_HASHES if a in (recorded or ()) and a in usable), None)


def _make_dataset_class():
    from streaming import StreamingDataset

    class StreamingTokens(StreamingDataset):
        """StreamingDataset whose items are `(sample_id, mask_epoch, ids)` after the sample rules."""

        def __init__(self, *, rules: SampleRules, epoch_offset: int, check_first: bool,
                     where: str, **kw: Any) -> None:  # fmt: skip
            super().__init__(**kw)
            self.rules, self.epoch_offset = rules, epoch_offset
            self.check_first, self.where = check_first, where
            self._epoch = 0

        def _resume_incr_epoch(self) -> tuple[int, int]:
            epoch, offset = super()._resume_incr_epoch()
            self._epoch = int(epoch)
            return epoch, offset

        def get_item(self, sample_id: int, retry: int = 7) -> tuple[int, int, np.ndarray]:
            raw = super().get_item(sample_id, retry)[INPUT_IDS]
            sid = int(sample_id)
            shard, row = self.spanner[sid]
            name = self.shards[shard].raw_data.basename
            at = f"sample {sid} (row {row} of shard {name} of {self.where})"
            if self.check_first and (len(raw) == 0 or int(raw[0]) != self.rules.cls_id):
                first = int(raw[0]) if len(raw) else None
                raise DataError(
                    f"{self.where} has no {META}, so the shards cannot be matched to the tokenizer, "
                    f"and {at} starts with id {first}, not the tokenizer's [CLS] id "
                    f"{self.rules.cls_id}: the shards were made with another tokenizer. Use the "
                    f"tokenizer that made them (config key `tokenizer`)"
                )
            return sid, self._epoch + self.epoch_offset, self.rules.apply(raw, where=at)

    return StreamingTokens


def build_streaming_train(
    data_cfg: Any,
    rules: SampleRules,
    tokenizer: Any,
    collator: Any,
    *,
    split: str,
    global_batch_size: int,
    world_size: int,
    epoch_offset: int,
    num_samples_in_batch: Any,
    get_num_tokens_in_batch: Any,
):
    """The training `DataSpec` of `data.order=streaming` (see the module doc)."""
    from composer.core import DataSpec
    from composer.utils import dist
    from torch.utils.data import DataLoader

    from ettin.data.remote import _Getter, join, probe_remote

    path = local_path(data_cfg.path)  # a file:// URL is a local folder
    remote = is_remote(path)
    if data_cfg.batch_size_warmup_tokens not in (None, "", "0", "0tok", 0):
        raise DataError(
            "data.order=streaming has no batch-size warm-up (data.batch_size_warmup_tokens="
            f"{data_cfg.batch_size_warmup_tokens}); set it to 0tok or use data.order=global"
        )
    if remote and not data_cfg.local_cache:
        raise DataError(
            f"data.path={path} is remote; data.order=streaming needs data.local_cache, the folder "
            f"its shards are streamed into (at most data.cache_limit of them)"
        )
    local = Path(data_cfg.local_cache) if data_cfg.local_cache else Path(path)
    source = path if (remote or data_cfg.local_cache) else None
    if source is not None and Path(source) != local:
        with dist.run_local_rank_zero_first():
            if remote:
                probe_remote(join(path, split, INDEX))
            index_file = local / split / INDEX
            if dist.get_local_rank() == 0 and not index_file.exists():
                _Getter(source)(f"{split}/{INDEX}", index_file)  # counted in the limit below
            if dist.get_local_rank() == 0 and not (local / META).exists():
                try:
                    _Getter(source)(META, local / META)
                except Exception as err:  # no meta.json: the first-token check applies
                    log.warning("%s has no %s (%s)", path, META, str(err).splitlines()[0])
    else:
        source = None
    if source is None:
        read_index(local / split)  # the loader's own checks of a local split
    meta = read_meta(local)
    check_tokenizer(meta, tokenizer, local)

    limit = parse_bytes(data_cfg.cache_limit) if data_cfg.cache_limit else None
    if limit is not None:
        # Streaming evicts for a shard before downloading it but counts it only once it is in,
        # so downloads in flight at once (its prepare thread, its ready thread and the reader,
        # per worker process) each overshoot its accounting by up to one shard. It gets the
        # limit less that reserve, so the split folder itself stays within data.cache_limit.
        index = read_index(local / split)
        biggest = max(
            int(sh["raw_data"]["bytes"]) + int((sh.get("zip_data") or {}).get("bytes", 0))
            for sh in index["shards"]
        )
        in_flight = 3 * max(1, int(data_cfg.num_workers))
        need = (in_flight - 1 + 4) * biggest + (local / split / INDEX).stat().st_size
        if limit < need:
            raise DataError(
                f"data.cache_limit={data_cfg.cache_limit} is too small for {join(path, split)}: "
                f"its index.json and {in_flight - 1 + 4} of its largest shards ({biggest} bytes, "
                f"raw + compressed) need {need} bytes; raise it (as high as the disk allows)"
            )
        limit -= (in_flight - 1) * biggest
    rank_batch = global_batch_size // world_size
    cls = _make_dataset_class()
    kwargs: dict[str, Any] = dict(
        remote=source,
        local=str(local),
        split=split,
        shuffle=True,
        shuffle_algo=data_cfg.shuffle_algo,
        shuffle_seed=data_cfg.shuffle_seed,
        shuffle_block_size=data_cfg.shuffle_block_size,
        num_canonical_nodes=data_cfg.num_canonical_nodes,
        batch_size=rank_batch,
        cache_limit=limit,
        download_retry=2,
    )
    index = None
    if (local / split / INDEX).exists():
        index = read_index(local / split)
    try:
        if index is not None and source is not None:
            kwargs["validate_hash"] = _hash_algo(index)
        dataset = cls(
            rules=rules,
            epoch_offset=epoch_offset,
            check_first=meta is None,
            where=join(path, split),
            **kwargs,
        )
    except ValueError as err:
        if "cache" in str(err).lower() and "limit" in str(err).lower():
            raise DataError(
                f"data.cache_limit={data_cfg.cache_limit} is too small for {join(path, split)}: "
                f"{err}"
            ) from None
        raise
    read_index(local / split)  # column types, shard entries (index.json is local by now)
    loader = DataLoader(
        dataset,
        batch_size=rank_batch,
        collate_fn=collator,
        num_workers=data_cfg.num_workers,
        drop_last=True,
        persistent_workers=data_cfg.num_workers > 0,
        prefetch_factor=2 if data_cfg.num_workers > 0 else None,
    )
    log.info(
        "data.order=streaming: %s/%s, %d samples, shuffle %s (seed %d, block %s), cache %s in %s",
        path,
        split,
        dataset.num_samples,
        data_cfg.shuffle_algo,
        data_cfg.shuffle_seed,
        dataset.shuffle_block_size,
        data_cfg.cache_limit or "unbounded",
        local,
    )
    return DataSpec(
        loader,
        num_samples=dataset.num_samples,
        get_num_samples_in_batch=num_samples_in_batch,
        get_num_tokens_in_batch=get_num_tokens_in_batch,
    )
