"""The `ettin` command: thin subcommands over the library's rooms.

Each room registers its own subcommands (`register(subparsers)`); this file only wires them up,
plus the few commands that span rooms (sizes, export, import, train).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

# Rooms that add their own subcommands, in the order `ettin --help` lists them.
ROOM_COMMANDS = ("ettin.prep.cli", "ettin.data.cli", "ettin.recipe", "ettin.eval.cli", "ettin.demo")


def cmd_sizes(args: argparse.Namespace) -> None:
    from ettin.model import SIZES, model_args, parameter_count

    rows = []
    for name in SIZES:
        a = model_args(name)
        counts = parameter_count(a)
        rows.append(
            {
                "size": name,
                "layers": a.num_layers,
                "hidden": a.hidden_size,
                "intermediate": a.intermediate_size,
                "heads": a.num_heads,
                "head_dim": a.head_dim,
                "global_layers": [i for i in range(a.num_layers) if a.is_global(i)],
                **counts,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'size':>6} {'L':>3} {'H':>5} {'I':>5} {'heads':>5}  {'params':>14}  {'non-embedding':>14}  global layers"
    )
    for r in rows:
        print(
            f"{r['size']:>6} {r['layers']:>3} {r['hidden']:>5} {r['intermediate']:>5} {r['heads']:>5}  "
            f"{r['total']:>14,}  {r['non_embedding']:>14,}  {r['global_layers']}"
        )
    print(
        "(vocabulary 50368, tied embeddings, decoder bias included; encoder and decoder are equal)"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from ettin.checkpoint import load_checkpoint
    from ettin.interop import export_hf

    model, info = load_checkpoint(args.checkpoint)
    tokenizer = args.tokenizer or info.tokenizer.get("path")
    out = export_hf(
        model, args.out_dir, tokenizer=tokenizer, allow_rope_mismatch=args.allow_rope_mismatch
    )
    kind = "AutoModelForCausalLM" if model.args.causal else "AutoModelForMaskedLM"
    print(
        f"exported {info.objective} model to {out} (load with transformers.{kind}.from_pretrained)"
    )


def cmd_import(args: argparse.Namespace) -> None:
    from ettin.checkpoint import CheckpointInfo, save_ettin_checkpoint
    from ettin.interop import import_hf

    model, tokenizer = import_hf(args.source)
    tok_info: dict = {}
    if tokenizer is not None:
        from ettin.prep.tokenizer import tokenizer_fingerprint

        tok_dir = args.out.with_suffix("") if args.out.suffix else args.out
        tok_dir = tok_dir.parent / (tok_dir.name + "-tokenizer")
        tokenizer.save_pretrained(tok_dir)
        tok_info = {"path": str(tok_dir), **tokenizer_fingerprint(tokenizer)}
    info = CheckpointInfo(
        model_args=model.args, objective="clm" if model.args.causal else "mlm", tokenizer=tok_info
    )
    path = save_ettin_checkpoint(args.out, model, info)
    print(f"wrote {path} ({info.objective}); start a run from it with init_from={path}")


def cmd_train(args: argparse.Namespace) -> None:
    from ettin.train import main as train_main

    train_main([args.config, *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ettin",
        description="Paired encoder/decoder training: sizes, data, order, export, recipes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sizes", help="print every size preset's shape and parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sizes)

    p = sub.add_parser(
        "export", help="write a Hugging Face model directory from an ettin checkpoint"
    )
    p.add_argument("checkpoint", help="Composer checkpoint (.pt), its folder, or an ettin .pt")
    p.add_argument("out_dir", help="output folder (config.json, model.safetensors, tokenizer)")
    p.add_argument(
        "--tokenizer", help="tokenizer dir to save beside the model (default: the run's)"
    )
    p.add_argument(
        "--allow-rope-mismatch",
        action="store_true",
        help="export a decoder whose local and global RoPE theta differ (HF ignores the local one)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="turn a Hugging Face ModernBERT encoder/decoder into an ettin checkpoint"
    )
    p.add_argument(
        "source", help="HF model directory, or a Hub name such as jhu-clsp/ettin-encoder-150m"
    )
    p.add_argument(
        "out", type=_path, help="output .pt file (start a run from it with init_from=...)"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "train", help="train one run (same as `composer src/main.py CONFIG ...` on one process)"
    )
    p.add_argument("config", help="run file, e.g. yamls/encoder-17m.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: key=value or group=option")
    p.set_defaults(func=cmd_train)

    for module in ROOM_COMMANDS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return parser


def _path(text: str):
    from pathlib import Path

    return Path(text)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # Our errors say what went wrong and what to do; a traceback would bury that.
        print(f"ettin {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
