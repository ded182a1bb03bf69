"""Data: MDS shards -> samples (sample rules) -> the global order -> batches (padding/packing).

- `dataset`: `TokenDataset` over one split, its validation and `DataError`.
- `order`: the permutation/step/rank rule, batch-size warm-up, skip ranges, exact resumption.
- `replay`: order files (recorded, exported or published): train from them, export, audit.
- `collate`: pad-to-longest or packing, with MLM masks from `ettin.objectives`.
- `loader`: `build_dataloader(...) -> composer DataSpec`, with exact resumption.
"""

from ettin.data.collate import Collator, MaskSpec, batch_sample_ids, pack, packing_efficiency
from ettin.data.dataset import DataError, SampleRules, TokenDataset
from ettin.data.loader import EvalSampler, OrderSampler, TrainDataset, build_dataloader
from ettin.data.order import BatchSchedule, DataOrder, build_order, permutation, rank_slice
from ettin.data.replay import (
    AuditReport,
    OrderTokens,
    Replay,
    audit,
    export_order,
    read_order,
    write_order,
)

__all__ = [
    "AuditReport",
    "BatchSchedule",
    "Collator",
    "DataError",
    "DataOrder",
    "EvalSampler",
    "MaskSpec",
    "OrderSampler",
    "OrderTokens",
    "Replay",
    "SampleRules",
    "TokenDataset",
    "TrainDataset",
    "audit",
    "batch_sample_ids",
    "build_dataloader",
    "build_order",
    "export_order",
    "pack",
    "packing_efficiency",
    "permutation",
    "rank_slice",
    "read_order",
    "write_order",
]
