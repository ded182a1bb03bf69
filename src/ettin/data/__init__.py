"""Data: MDS shards -> samples (sample rules) -> the global order -> batches (padding/packing).

- `dataset`: `TokenDataset` over one split, its validation and `DataError`.
- `order`: the permutation/step/rank rule, batch-size warm-up, skip ranges, exact resumption.
- `replay`: order files (recorded, exported or published): train from them, export, audit.
- `collate`: pad-to-longest or packing, with MLM masks from `ettin.objectives`.
- `loader`: `build_dataloader(...) -> composer DataSpec`, with exact resumption.
"""

import importlib

# Names -> the module that defines them. Loaded on first use (PEP 562), so that `ettin --help`
# and the data subcommands' `--help` need not import torch, Composer or Streaming.
_NAMES = {
    "collate": ("Collator", "MaskSpec", "batch_sample_ids", "pack", "packing_efficiency"),
    "dataset": ("DataError", "SampleRules", "TokenDataset"),
    "loader": ("EvalSampler", "OrderSampler", "TrainDataset", "build_dataloader"),
    "order": ("BatchSchedule", "DataOrder", "build_order", "permutation", "rank_slice"),
    "replay": (
        "AuditReport",
        "OrderTokens",
        "Replay",
        "audit",
        "export_order",
        "read_order",
        "write_order",
    ),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"ettin.data.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'ettin.data' has no attribute {name!r}")
