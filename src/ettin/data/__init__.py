"""Data: MDS shards -> samples (sample rules) -> the global order -> batches (padding/packing).

- `shards`: a split on disk (index.json, shard files in the split or its subfolders), its
  checks and `DataError`: the lowest module, imported by all the others.
- `remote`: object stores and compressed shards, fetched (verified) into a local cache.
- `dataset`: the sample rules and `TokenDataset` over one split.
- `order_file`: order files (a file, a folder, the published tree): parts, fetch, step index.
- `skips`: skip ranges, `data.skip_steps` and the run folder's `skip_steps.json`.
- `order`: the permutation/step/rank rule, batch-size warm-up, exact resumption, `order_for_run`.
- `replay`: training from order files (their tokens, the fit check), export, audit.
- `streaming`: Streaming's own order for splits that do not fit a node.
- `collate`: pad-to-longest or packing, with MLM masks from `ettin.objectives`.
- `loader`: `build_dataloader(...) -> composer DataSpec`, with exact resumption.
"""

import importlib

# Names -> the module that defines them. Loaded on first use (PEP 562), so that `ettin --help`
# and the data subcommands' `--help` need not import torch, Composer or Streaming.
_NAMES = {
    "collate": ("Collator", "MaskSpec", "batch_sample_ids", "pack", "packing_efficiency"),
    "dataset": ("SampleRules", "TokenDataset"),
    "shards": ("DataError", "read_index", "verify_split"),
    "loader": ("EvalSampler", "OrderSampler", "TrainDataset", "build_dataloader"),
    "order": ("BatchSchedule", "DataOrder", "build_order", "permutation", "rank_slice"),
    "order_file": ("Replay", "read_order", "write_order"),
    "replay": ("AuditReport", "OrderTokens", "audit", "check_fits", "export_order"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"ettin.data.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'ettin.data' has no attribute {name!r}")
