"""`ettin order ...`: export the planned data order, check a replay file, audit a recorded order.

ettin order export yamls/RUN.yaml [overrides...] --steps N --out order.parquet [--with-tokens]
ettin order replay yamls/RUN.yaml [overrides...] [--order order.parquet]
ettin order audit RECORDED PLANNED
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def _load(config: str, overrides: list[str]):
    """(cfg, tokenizer, train TokenDataset) of a run file, with every data check applied."""
    from ettin.config import load_config
    from ettin.data.dataset import SampleRules, TokenDataset
    from ettin.prep.tokenizer import default_tokenizer_dir, load_tokenizer

    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer_dir())
    rules = SampleRules.from_tokenizer(
        tokenizer, max_seq_len=cfg.data.max_seq_len, encoder=cfg.objective.name == "mlm"
    )
    dataset = TokenDataset(
        cfg.data.path,
        cfg.data.train_split,
        rules,
        tokenizer=tokenizer,
        local_cache=cfg.data.local_cache,
    )
    return cfg, tokenizer, dataset


def _order(cfg: Any, num_samples: int, order_file: str | None):
    from ettin.data.order import build_order

    return build_order(
        num_samples,
        global_batch_size=cfg.global_train_batch_size,
        seed=cfg.data.shuffle_seed,
        max_seq_len=cfg.data.max_seq_len,
        warmup_tokens=cfg.data.batch_size_warmup_tokens,
        warmup_min=cfg.data.batch_size_warmup_min,
        order_file=order_file,
    )


def cmd_export(args: argparse.Namespace) -> None:
    from ettin.data.order import export_order, write_order

    cfg, _, dataset = _load(args.config, args.overrides)
    order = _order(cfg, len(dataset), cfg.data.order_file)
    table = export_order(
        order, args.steps, first_step=args.first_step, dataset=dataset if args.with_tokens else None
    )
    path = write_order(table, args.out)
    steps = np.unique(table.column("step").to_numpy())
    print(
        f"wrote {table.num_rows} samples of steps {int(steps[0])}-{int(steps[-1])} to {path} "
        f"(columns: {', '.join(table.column_names)}); replay with data.order_file={path}"
    )


def cmd_replay(args: argparse.Namespace) -> None:
    from ettin.data.order import Replay, read_order

    cfg, _, dataset = _load(args.config, args.overrides)
    path = args.order or cfg.data.order_file
    if not path:
        raise ValueError("give the order file with --order PATH (or data.order_file=PATH)")
    table = read_order(path)
    replay = Replay.from_table(table, source=str(path))
    order = _order(cfg, len(dataset), str(path))  # checks ids against the dataset
    sizes = np.diff(replay.bounds)
    checked = 0
    if "input_ids" in table.column_names:
        n = min(args.check_tokens, table.num_rows)
        sample_ids = table.column("sample_id").to_numpy()[:n]
        tokens = table.column("input_ids").slice(0, n).to_pylist()
        for row in range(n):
            sid = int(sample_ids[row])
            want = dataset[sid][1]
            got = np.asarray(tokens[row], np.int64)
            if not np.array_equal(want, got):
                raise ValueError(
                    f"{path}: row {row} (sample {sid}) holds other tokens than this dataset's sample "
                    f"{sid}: the order file belongs to another dataset or tokenizer"
                )
            checked += 1
    print(
        f"{path}: {replay.num_steps} steps (from step {replay.first_step}), {len(replay.sample_ids)} samples"
    )
    print(
        f"  global batch sizes: min {int(sizes.min())}, max {int(sizes.max())}; sample ids < {len(dataset)}: ok"
    )
    if checked:
        print(f"  input_ids of the first {checked} rows match the dataset after the sample rules")
    print(f"  steps per epoch when replayed: {order.steps_in_epoch(0)}")
    print(
        "train from it: "
        + " ".join(["ettin train", args.config, *args.overrides, f"data.order_file={path}"])
    )


def cmd_audit(args: argparse.Namespace) -> None:
    from ettin.data.order import audit, read_order

    report = audit(read_order(args.recorded), read_order(args.planned))
    print(report)
    if not report.ok:
        raise SystemExit(1)


def register(subparsers: Any) -> None:
    """Add `ettin order {export,replay,audit}`."""
    p = subparsers.add_parser("order", help="export, replay-check or audit the global data order")
    sub = p.add_subparsers(dest="order_command", metavar="ACTION", required=True)

    e = sub.add_parser(
        "export", help="write the planned order of a run (one row per sample) to Parquet"
    )
    e.add_argument("config", help="run file, e.g. yamls/encoder-150m.yaml")
    e.add_argument("overrides", nargs="*", help="Hydra overrides: key=value")
    e.add_argument("--steps", type=int, required=True, help="number of optimiser steps to export")
    e.add_argument("--first-step", type=int, default=0, help="first global step (default 0)")
    e.add_argument("--out", required=True, help="output Parquet file")
    e.add_argument(
        "--with-tokens",
        action="store_true",
        help="add an input_ids column (after the sample rules)",
    )
    e.set_defaults(func=cmd_export)

    r = sub.add_parser(
        "replay", help="check an order file against a run's dataset and say how to train from it"
    )
    r.add_argument("config", help="run file whose data the order file refers to")
    r.add_argument("overrides", nargs="*", help="Hydra overrides: key=value")
    r.add_argument("--order", help="order file (default: the config's data.order_file)")
    r.add_argument(
        "--check-tokens",
        type=int,
        default=1000,
        help="rows whose input_ids to compare (if present)",
    )
    r.set_defaults(func=cmd_replay)

    a = sub.add_parser(
        "audit", help="compare a recorded order with a planned one; exit 1 at the first difference"
    )
    a.add_argument(
        "recorded", help="recorded order (the run's data_order folder or a Parquet file)"
    )
    a.add_argument("planned", help="planned order (from `ettin order export`)")
    a.set_defaults(func=cmd_audit)
