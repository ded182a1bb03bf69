"""`ettin order ...` and `ettin data verify`: the data order, and the shards' integrity.

ettin order export yamls/RUN.yaml [overrides...] --steps N --out order.parquet [--with-tokens]
    [--format ettin]
ettin order replay yamls/RUN.yaml [overrides...] [--order order.parquet]
ettin order audit RECORDED PLANNED [--packed]
ettin data verify DIR
ettin data decompress DIR [--remove-zip]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def _load(config: str, overrides: list[str], order_file: str | None = None):
    """(cfg, rules, shards, replay, train data) of a run file, with every data check applied.

    `order_file` (default: the config's data.order_file) is opened as a `Replay`; `shards` is
    the train split's TokenDataset, None for an order file that holds only tokens; the train
    data is the shards, or the order file's tokens (`OrderTokens`).
    """
    from ettin.config import load_config
    from ettin.data.dataset import SampleRules, TokenDataset
    from ettin.data.replay import OrderTokens, Replay
    from ettin.tokenizer import default_tokenizer_dir, load_tokenizer

    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer_dir())
    rules = SampleRules.from_tokenizer(
        tokenizer, max_seq_len=cfg.data.max_seq_len, encoder=cfg.objective.name == "mlm"
    )
    path = order_file or cfg.data.order_file
    replay = (
        Replay.open(path, local_cache=cfg.data.local_cache, phase=cfg.data.order_phase)
        if path
        else None
    )
    shards = None
    if replay is None or replay.sample_ids is not None:
        shards = TokenDataset(
            cfg.data.path,
            cfg.data.train_split,
            rules,
            tokenizer=tokenizer,
            local_cache=cfg.data.local_cache,
        )
    data = OrderTokens(replay, rules) if replay is not None and replay.has_tokens else shards
    return cfg, rules, shards, replay, data


def _order(cfg: Any, num_samples: int, replay: Any):
    from ettin.data.order import build_order

    return build_order(
        num_samples,
        global_batch_size=cfg.global_train_batch_size,
        seed=cfg.data.shuffle_seed,
        max_seq_len=cfg.data.max_seq_len,
        warmup_tokens=cfg.data.batch_size_warmup_tokens,
        warmup_min=cfg.data.batch_size_warmup_min,
        order_file=replay,
        skip_steps=cfg.data.skip_steps,
    )


def cmd_export(args: argparse.Namespace) -> None:
    from ettin.data.replay import export_order, write_order

    cfg, _, _, replay, data = _load(args.config, args.overrides)
    order = _order(cfg, len(data), replay)
    steps = args.steps
    if steps is None:
        if replay is None:
            raise SystemExit("give --steps N (the number of optimiser steps to export)")
        steps = len(order.kept(0))  # the whole order file
    published = args.format == "ettin"
    table = export_order(
        order,
        steps,
        first_step=args.first_step,
        dataset=data if args.with_tokens or published else None,
        tokens_only=published,
    )
    path = write_order(table, args.out)
    steps = np.unique(table.column("step").to_numpy())
    print(
        f"wrote {table.num_rows} samples of steps {int(steps[0])}-{int(steps[-1])} to {path} "
        f"(columns: {', '.join(table.column_names)}); replay with data.order_file={path}"
    )


def cmd_replay(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ettin.data.replay import check_fits

    path = args.order
    cfg, rules, shards, replay, data = _load(args.config, args.overrides, order_file=path)
    path = path or cfg.data.order_file
    if not path:
        raise ValueError("give the order file with --order PATH (or data.order_file=PATH)")
    order = _order(cfg, len(data), replay)  # checks ids against the dataset
    sizes = replay.sizes
    checked = 0
    if replay.has_tokens:
        check_fits(replay, order.schedule, cfg.data.max_seq_len, rules.vocab_size)
        replay.check_rows(cfg.data.max_seq_len, rules.vocab_size)
    if replay.has_tokens and shards is not None:
        n = min(args.check_tokens, replay.num_rows)
        for row in range(n):
            sid, got = data[row]
            want = shards[sid][1]
            if not np.array_equal(want, got):
                raise ValueError(
                    f"{path}: row {row} (sample {sid}) holds other tokens than this dataset's sample "
                    f"{sid}: the order file belongs to another dataset or tokenizer"
                )
            checked += 1
    print(
        f"{replay.source}: {replay.num_steps} steps (from step {replay.first_step}), "
        f"{replay.num_rows} samples"
    )
    if len(replay.names) > 1:
        folders = list(dict.fromkeys(str(Path(n).parent) for n in replay.names))
        print(f"  {len(replay.names)} parts in {len(folders)} folders: {', '.join(folders[:6])}"
              + (", ..." if len(folders) > 6 else ""))  # fmt: skip
    if shards is None:
        print(
            f"  the file holds the tokens (no shards read): every row fits max_seq_len="
            f"{cfg.data.max_seq_len} and the tokenizer's {rules.vocab_size} ids"
        )
    else:
        print(f"  sample ids < {len(shards)}: ok")
    print(f"  global batch sizes: min {int(sizes.min())}, max {int(sizes.max())}")
    if checked:
        print(f"  input_ids of the first {checked} rows match the dataset after the sample rules")
    print(f"  steps per epoch when replayed: {len(order.kept(0))}")
    extra = [f"data.order_file={path}"] if args.order else []
    print("train from it: " + " ".join(["ettin train", args.config, *args.overrides, *extra]))


def _run_packs(recorded: str) -> bool | None:
    """data.packing of the run a recorded order belongs to (its run folder's config.yaml), if known."""
    from pathlib import Path

    from omegaconf import OmegaConf

    config = Path(recorded).resolve().parent / "config.yaml"
    if not config.is_file():
        return None
    try:
        value = OmegaConf.select(OmegaConf.load(config), "data.packing")
    except Exception:
        return None
    return bool(value) if value is not None else None


def cmd_audit(args: argparse.Namespace) -> None:
    from ettin.data.replay import audit, read_order

    packed = args.packed if args.packed is not None else _run_packs(args.recorded)
    report = audit(read_order(args.recorded), read_order(args.planned), ordered=not packed)
    print(report)
    if not report.ok:
        raise SystemExit(1)


def cmd_verify(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tqdm.auto import tqdm

    from ettin.data.shards import DataError, read_index, split_dirs, verified, verify_split

    root = Path(args.dir)
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder; give a prepared phase (or its parent, or a split)"
        )
    splits = split_dirs(root)
    if not splits:
        raise DataError(f"no MDS split (index.json) under {root}; prepare it with `ettin prep`")
    indexes = {split: read_index(split) for split in splits}
    total = sum(int(s["raw_data"].get("bytes", 0)) for i in indexes.values() for s in i["shards"])
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=args.quiet) as bar:
        checks = [verify_split(split, progress=bar.update) for split in splits]
    problems = [line for check in checks for line in check.problems]
    if problems:
        for line in problems:
            print(f"CORRUPT: {line}" if "is corrupted" in line else f"PROBLEM: {line}")
        shards = sum(check.shards for check in checks)
        print(f"{len(problems)} of {shards} shards in {len(splits)} splits under {root} failed")
        raise SystemExit(1)
    print(f"OK: {verified(checks, root)}")


def cmd_decompress(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ettin.data.remote import decompress_split
    from ettin.data.shards import DataError, split_dirs

    root = Path(args.dir)
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder; give a split (or a phase, or the folder of several)"
        )
    splits = split_dirs(root)
    if not splits:
        raise DataError(f"no MDS split (index.json) under {root}")
    done = kept = 0
    for split in splits:
        n, already = decompress_split(split, quiet=args.quiet, keep_zip=not args.remove_zip)
        done, kept = done + n, kept + already
    print(
        f"OK: decompressed {done} shards ({kept} already readable) in {len(splits)} splits under "
        f"{root}, each checked against index.json; train on it as it is"
    )


def register(subparsers: Any) -> None:
    """Add `ettin order {export,replay,audit}`."""
    p = subparsers.add_parser("order", help="export, replay-check or audit the global data order")
    sub = p.add_subparsers(dest="order_command", metavar="ACTION", required=True)

    e = sub.add_parser(
        "export", help="write the planned order of a run (one row per sample) to Parquet"
    )
    e.add_argument("config", help="run file, e.g. yamls/encoder-150m.yaml")
    e.add_argument("overrides", nargs="*", help="Hydra overrides: key=value")
    e.add_argument(
        "--steps",
        type=int,
        help="number of optimiser steps to export (default with data.order_file: all of it)",
    )
    e.add_argument("--first-step", type=int, default=0, help="first global step (default 0)")
    e.add_argument("--out", required=True, help="output Parquet file")
    e.add_argument(
        "--with-tokens",
        action="store_true",
        help="add an input_ids column (after the sample rules)",
    )
    e.add_argument(
        "--format",
        choices=("order", "ettin"),
        default="order",
        help="order: step, sample_id, epoch (default); ettin: the published ettin-data-order "
        "schema, step and input_ids (after the sample rules). Convert a recorded order with "
        "data.order_file=runs/RUN/data_order.parquet",
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
    a.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the run packs sequences, so only each step's set of samples counts (default: "
        "data.packing from the run's config.yaml beside RECORDED, else not packed: the order "
        "inside a step must match too)",
    )
    a.set_defaults(func=cmd_audit)

    d = subparsers.add_parser("data", help="check prepared MDS shards")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    v = dsub.add_parser(
        "verify",
        help="check every shard (file, size, header, content hash) of a prepared phase; exit 1 "
        "on any problem",
    )
    v.add_argument("dir", help="a prepared phase, the folder of several, or one split")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)
    z = dsub.add_parser(
        "decompress",
        help="decompress the compressed shards (.mds.zstd, ...) of a split in place, each checked "
        "against index.json's hashes; idempotent",
    )
    z.add_argument("dir", help="a split, a phase, or the folder of several")
    z.add_argument("--quiet", action="store_true", help="no progress bar")
    z.add_argument(
        "--remove-zip", action="store_true", help="delete each compressed shard once decompressed"
    )
    z.set_defaults(func=cmd_decompress)
