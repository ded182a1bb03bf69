"""The `ettin` command: thin subcommands over the library's rooms.

Each room registers its own subcommands (`register(subparsers)`); this file only wires them up,
plus the few commands that span rooms (sizes, export, import, train). Errors print one line;
`--debug` anywhere on the command line (or ETTIN_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ettin.errors import UsageError, debugging, one_line_errors

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
    from ettin.interop import export_hf, load_any_checkpoint

    if args.all or args.recipe:
        _export_all(args)
        return
    if not args.out_dir:
        raise UsageError("ettin export CHECKPOINT OUT_DIR: OUT_DIR is missing")
    model, info = load_any_checkpoint(args.checkpoint)  # ours or the reference's
    tokenizer = args.tokenizer or info.tokenizer.get("path")
    out = export_hf(
        model,
        args.out_dir,
        tokenizer=tokenizer,
        allow_rope_mismatch=args.allow_rope_mismatch,
        max_seq_len=args.max_seq_len or info.max_seq_len,  # the trained length
        base_config=info.hf_config,  # an imported model's fields that ettin does not model
        objectives=info.lineage.get("objectives"),  # tells cross-objective models apart
    )
    kind = "AutoModelForCausalLM" if model.args.causal else "AutoModelForMaskedLM"
    print(
        f"exported {info.objective} model to {out} (load with transformers.{kind}.from_pretrained)"
    )


def _export_all(args: argparse.Namespace) -> None:
    """`ettin export --all RUN_DIR OUT` / `--all --recipe R --runs-root D OUT`: every checkpoint."""
    from ettin.interop.revisions import INDEX, export_all, export_runs

    if args.recipe:  # the positionals are then just OUT (given as `checkpoint`)
        from ettin.recipe import plan

        out = args.out_dir or args.checkpoint
        stages = plan(args.recipe, args.set, args.runs_root)
        runs = [(st.cfg.run_name, Path(st.cfg.run_dir)) for st in stages]
        models = export_runs(runs, out, tokenizer=args.tokenizer)
        for model, revs in models.items():
            print(f"{model}: {len(revs)} revisions -> {Path(out) / model} ({INDEX})")
        return
    if not args.out_dir:
        raise UsageError("ettin export --all RUN_DIR OUT: OUT is missing")
    revs = export_all(args.checkpoint, args.out_dir, tokenizer=args.tokenizer)
    names = ", ".join(r.revision for r in revs)
    print(f"exported {len(revs)} revisions ({names}) to {args.out_dir}; index {INDEX}")


def cmd_publish(args: argparse.Namespace) -> None:
    from ettin.interop.revisions import publish

    pushed = publish(args.out_dir, args.repo, private=args.private, main=args.main, tags=args.tags)
    kind = "tags" if args.tags else "branches"
    print(f"pushed {len(pushed)} revisions to {args.repo} as {kind}: {', '.join(pushed)}")


def _import_reference(args: argparse.Namespace) -> None:
    """`ettin import ref.pt OUT.pt` or `ettin import ref.pt --resume-into RUN_DIR --config F`."""
    from ettin.interop.reference import read_reference, write_tokenizer

    if args.resume_into:
        from ettin.config import load_config, to_run_config
        from ettin.resume import resume_into

        run_dir = Path(args.resume_into)
        overrides = [*args.set, f"run_dir={run_dir}"]
        if args.config:
            cfg = load_config(args.config, overrides)
        elif (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            raw = OmegaConf.merge(
                OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(overrides)
            )
            cfg = to_run_config(raw)
        else:
            raise UsageError(
                f"--resume-into {run_dir}: pass --config RUN.yaml (the run file you will resume "
                "with, e.g. yamls/encoder-150m.yaml) so the data, batch size and optimizer match"
            )
        path, cfg = resume_into(args.source, cfg, weights_only=args.weights_only)
        window = (
            f" model.causal_window={cfg.model.causal_window}"
            if cfg.model.causal_window != "hf"
            else ""
        )
        print(
            f"wrote {path}; continue the reference run with the same config and "
            f"run_dir={run_dir}{window} (autoresume starts at its batch)"
        )
        return
    if args.out is None:
        raise UsageError("ettin import REF.pt OUT.pt (or --resume-into RUN_DIR): OUT is missing")
    from ettin.checkpoint import CheckpointInfo, load_weights, save_ettin_checkpoint
    from ettin.model import EttinModel

    ref = read_reference(args.source)
    tok_info: dict = {}
    tok_dir = write_tokenizer(ref.tokenizer_files, _sibling(args.out, "-tokenizer"))
    args_ = ref.model_args
    if tok_dir is not None:
        from transformers import AutoTokenizer

        from ettin.tokenizer import tokenizer_fingerprint

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        tok_info = {"path": str(tok_dir), **tokenizer_fingerprint(tokenizer)}
        import dataclasses

        args_ = dataclasses.replace(args_, pad_token_id=tokenizer.pad_token_id)
    model = EttinModel(args_)
    load_weights(model, ref.state, source=ref.source)
    info = CheckpointInfo(
        model_args=args_,
        objective=ref.objective,
        tokenizer=tok_info,
        lineage={"reference": ref.source, "objectives": [ref.objective]},
    )
    path = save_ettin_checkpoint(args.out, model, info)
    stamp = ref.timestamp
    print(
        f"wrote {path}: reference {ref.kind} at batch {stamp.get('batch')} "
        f"({stamp.get('token')} tokens); start a run from it with init_from={path}"
    )


def _sibling(out: Path, suffix: str) -> Path:
    base = out.with_suffix("") if out.suffix else out
    return base.parent / (base.name + suffix)


def _is_reference(source: str) -> bool:
    """A file that is a Composer checkpoint (the reference's raw checkpoints are)."""
    p = Path(source)
    return p.is_file() and p.suffix == ".pt"


def cmd_import(args: argparse.Namespace) -> None:
    from ettin.checkpoint import CheckpointInfo, save_ettin_checkpoint
    from ettin.interop import import_hf, read_hf_config
    from ettin.interop.revisions import split_revision

    if _is_reference(args.source):
        _import_reference(args)
        return
    if args.resume_into:
        raise UsageError(
            "--resume-into needs a Composer checkpoint (.pt) with optimizer state; a Hugging Face "
            "model holds weights only: start from it with `ettin import SRC OUT.pt` + init_from="
        )
    if args.out is None:
        raise UsageError("ettin import SOURCE OUT.pt: OUT is missing")
    source, revision = split_revision(args.source, args.revision)
    model, tokenizer = import_hf(source, revision=revision)  # the tokenizer in its training form
    raw_config = read_hf_config(source, revision=revision)
    tok_info: dict = {}
    if tokenizer is not None:
        from ettin.tokenizer import tokenizer_fingerprint

        tok_dir = args.out.with_suffix("") if args.out.suffix else args.out
        tok_dir = tok_dir.parent / (tok_dir.name + "-tokenizer")
        tokenizer.save_pretrained(tok_dir)
        tok_info = {"path": str(tok_dir), **tokenizer_fingerprint(tokenizer)}
    info = CheckpointInfo(
        model_args=model.args,
        objective="clm" if model.args.causal else "mlm",
        tokenizer=tok_info,
        max_seq_len=raw_config.get("max_position_embeddings"),
        hf_config=raw_config,
    )
    if revision is not None:
        info.lineage["hf_source"] = f"{source}@{revision}"
    if raw_config.get("ettin_objectives"):  # an ettin export keeps its lineage
        info.lineage["objectives"] = list(raw_config["ettin_objectives"])
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
    p.add_argument(
        "checkpoint",
        help="Composer checkpoint (.pt), its folder, or an ettin .pt; with --all a run folder",
    )
    p.add_argument(
        "out_dir", nargs="?", help="output folder (config.json, model.safetensors, tokenizer)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="every checkpoint of the run folder, one HF folder per revision (step/ext/decayN)",
    )
    p.add_argument(
        "--recipe", help="with --all: every run of this recipe chain (OUT/<model>/<revision>)"
    )
    p.add_argument("--runs-root", help="with --recipe: the chain's runs_root")
    p.add_argument(
        "--set", nargs="*", default=[], help="with --recipe: overrides for every stage (key=value)"
    )
    p.add_argument(
        "--tokenizer", help="tokenizer dir to save beside the model (default: the run's)"
    )
    p.add_argument(
        "--allow-rope-mismatch",
        action="store_true",
        help="export a decoder whose local and global RoPE theta differ (HF ignores the local one)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="sequence length to record (default: the one the checkpoint was trained at)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="turn a Hugging Face ModernBERT encoder/decoder into an ettin checkpoint"
    )
    p.add_argument(
        "source",
        help="HF model directory, a Hub name such as jhu-clsp/ettin-encoder-150m (REPO@REV for "
        "a revision tag or branch, e.g. @step599525), or a reference Composer checkpoint (.pt, "
        "e.g. downloaded from the model repo jhu-clsp/ettin-checkpoints)",
    )
    p.add_argument(
        "out",
        type=_path,
        nargs="?",
        help="output .pt file (start a run from it with init_from=...)",
    )
    p.add_argument("--revision", help="Hub revision (tag or branch), same as REPO@REV")
    p.add_argument(
        "--resume-into",
        help="reference .pt only: write a resumable checkpoint of our trainer into this run folder",
    )
    p.add_argument("--config", help="with --resume-into: the run file you will resume with")
    p.add_argument(
        "--set", nargs="*", default=[], help="with --resume-into: config overrides (key=value)"
    )
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="with --resume-into: keep the time and data position, start fresh optimizer moments",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("publish", help="push `ettin export --all` folders as Hub revisions")
    p.add_argument("out_dir", help="folder written by `ettin export --all` (revisions.json)")
    p.add_argument("repo", help="Hub repo id, e.g. me/ettin-encoder-17m")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--main", help="also upload this revision to the main branch")
    p.add_argument(
        "--tags",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each revision a git tag on a commit of main, as the Ettin release (default); "
        "--no-tags: a branch per revision",
    )
    p.set_defaults(func=cmd_publish)

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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, where a subcommand's `key=value` overrides may also follow its options.

    argparse fills a `nargs="*"` positional once, so `ettin order export CFG --steps 6 a=b`
    would leave `a=b` unrecognised; such leftovers join the subcommand's `overrides`.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if not stray:
            args.overrides += extra
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    if debug:
        os.environ["ETTIN_DEBUG"] = "1"  # `ettin train` runs the training entry, which reads it
    args = parse_args([a for a in argv if a != "--debug"])
    with one_line_errors(f"ettin {args.command}", debug):
        args.func(args)


if __name__ == "__main__":
    main()
