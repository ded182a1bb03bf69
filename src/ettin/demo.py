"""`ettin demo` (`make demo`): the whole Ettin idea on a laptop, offline, in minutes.

1. prepare the bundled corpus (tokenizer, shards), reusing what exists;
2. train a paired demo encoder and decoder (one config, one data order; objective and mask differ);
3. continue each with the other objective (the cross-objective stage);
4. evaluate all four on the held-out split against chance/unigram baselines;
5. export them to Hugging Face and reload them with the Auto classes: `fill-mask` on prompts with
   known answers (how many the encoders get right) and `generate`;
6. a downstream recipe on the exports: the demo encoder fine-tuned as a dense retriever
   (recipes/downstream/dense.py), nDCG@10 on held-out queries before and after;
7. write a report folder: loss curves, a Markdown summary, the exported models, the data order.
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
# Fill-mask prompts with the content word(s) the speeches use there: a top-1 hit is a prompt
# learned. Every answer is one token of the Ettin tokenizer (with its leading space; see
# `answer_ids`), and each phrase is frequent in the corpus (counts of the phrase in the speeches).
FILL_MASK: list[tuple[str, tuple[str, ...]]] = [
    ("The Congress of the United [MASK] has passed the bill.", ("States",)),  # 4852
    ("The United [MASK] of America", ("States",)),
    ("Fellow citizens of the Senate and House of [MASK]", ("Representatives",)),  # 281
    ("the report of the Secretary of the [MASK]", ("Treasury", "Navy", "Interior")),  # 260/134
    ("a decision of the Supreme [MASK]", ("Court",)),  # 150
    ("our relations with Great [MASK] and France", ("Britain",)),  # 518
    ("The state of our [MASK] is strong.", ("Union",)),
    ("the powers of the Federal [MASK]", ("Government",)),  # 458
    ("the will of the American [MASK]", ("people",)),  # 384
    ("the Congress of the [MASK] States", ("United",)),
]
PROMPTS = [
    "Fellow citizens of the Senate and",
    "The state of our Union is",
    "I recommend to the Congress",
]


_T0 = time.time()


def _say(step: int, text: str) -> None:
    print(f"\n[{step}/7] {text}  (t={time.time() - _T0:.0f}s)", flush=True)


def prepare_data(data_root: Path) -> Path:
    """Tokenizer and shards for the demo phase, reused when they already exist."""
    from ettin.prep.pipeline import prep
    from ettin.tokenizer import build_ettin_tokenizer

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


def answer_ids(tokenizer, answers: tuple[str, ...]) -> set[int]:
    """Token ids of the expected words as they follow a space; each must be a single token."""
    ids = set()
    for word in answers:
        pieces = tokenizer(" " + word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(f"fill-mask answer {word!r} is {len(pieces)} tokens, not one")
        ids.add(pieces[0])
    return ids


def fill_mask_report(fill, tokenizer) -> list[dict]:
    """Top-3 of every FILL_MASK prompt, and whether the top-1 is one of its expected words."""
    results = []
    for text, answers in FILL_MASK:
        best = fill(text.replace("[MASK]", tokenizer.mask_token), top_k=3)
        results.append(
            {
                "prompt": text,
                "answers": list(answers),
                "top": [(b["token_str"].strip(), float(b["score"])) for b in best],
                "hit": best[0]["token"] in answer_ids(tokenizer, answers),
            }
        )
    return results


def fill_mask_line(r: dict) -> str:
    """`+ prompt -> 'a' 0.41, 'b' 0.07, 'c' 0.02 (expected States)`: + right, - not."""
    top = ", ".join(f"'{t}' {p:.2f}" for t, p in r["top"])
    return f"{'+' if r['hit'] else '-'} {r['prompt']} -> {top} (expected {'/'.join(r['answers'])})"


def fill_mask_count(name: str, results: list[dict]) -> str:
    hits = sum(r["hit"] for r in results)
    return (
        f"{name}: {hits}/{len(results)} fill-mask prompts right (top-1 = the expected content word)"
    )


def hf_showcase(runs: Path) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """Reload the exported models with the Auto classes and use them the way HF users would.

    Returns the decoders' generations (name -> lines) and the encoders' fill-mask results."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

    shown: dict[str, list[str]] = {}
    fills: dict[str, list[dict]] = {}
    for name in STAGES:
        hf = runs / name / "hf"
        tok = AutoTokenizer.from_pretrained(hf)
        if "encoder" in name.split("-from-")[0]:
            model = AutoModelForMaskedLM.from_pretrained(hf, attn_implementation="sdpa")
            fill = pipeline("fill-mask", model=model, tokenizer=tok, device=-1)
            fills[name] = fill_mask_report(fill, tok)
            print(fill_mask_count(name, fills[name]))
            for r in fills[name]:
                print("  " + fill_mask_line(r))
        else:
            model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa")
            lines = []
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
                text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                lines.append(f"{prompt} -> ...{' '.join(text.split())}")  # one line
            shown[name] = lines
            print(f"{name}:")
            for line in lines:
                print("  " + line)
    return shown, fills


DENSE_STEPS = 200  # sentence-transformers steps of the downstream example (batch 16, ~10 s)


def dense_retrieval(out: Path, heldout: list[str], *, quick: bool = False) -> dict | None:
    """The downstream dense-retrieval recipe (recipes/downstream/dense.py) on the demo encoder's
    export: nDCG@10 before and after fine-tuning, on queries from `heldout` speeches (the demo's
    validation split: the models never trained on them). Cached in downstream/dense.json until
    the export changes; None where the recipes folder is absent."""
    import contextlib
    import importlib.util
    import logging

    from ettin.prep.corpus import fetch_sotu

    model = out / "demo-encoder" / "hf"
    recipe = REPO / "recipes" / "downstream" / "dense.py"
    if not recipe.exists():
        print(f"{recipe} not found (not a source checkout): skipping the downstream example")
        return None
    steps, batch_size = (4, 8) if quick else (DENSE_STEPS, 16)
    key = {"model_mtime": (model / "config.json").stat().st_mtime, "steps": steps, "heldout": 1}
    cache = out / "downstream" / "dense.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            print("dense retrieval already measured for this export: reusing it")
            return saved
    spec = importlib.util.spec_from_file_location("ettin_recipe_dense", recipe)
    dense = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dense)
    cache.parent.mkdir(parents=True, exist_ok=True)
    quiet = [logging.getLogger(n) for n in ("transformers", "sentence_transformers")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # also turns off the Trainer's progress bar
    t0 = time.time()
    try:  # the recipe's own log (trainer losses, its result line) goes to downstream/dense.log
        with (
            open(cache.parent / "dense.log", "w") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            result = dense.run(
                str(model), steps=steps, batch_size=batch_size, corpus=fetch_sotu(), heldout=heldout
            )
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    result = {**result, **key, "batch_size": batch_size, "limit": 64}
    result["seconds"] = round(time.time() - t0, 1)
    cache.write_text(json.dumps(result, indent=2))
    return result


def dense_line(result: dict) -> str:
    return (
        f"dense retriever (demo-encoder export, {result['steps']} steps of "
        f"MultipleNegativesRankingLoss): nDCG@10 {result['before']:.3f} -> {result['after']:.3f}"
    )


def run_demo(out: Path, data_root: Path, *, quick: bool = False) -> Path:
    """Run every step, reusing finished work; returns the report folder."""
    from ettin.eval.suite import run_suite
    from ettin.prep.corpus import fetch_sotu
    from ettin.recipe import run_recipe
    from ettin.tokenizer import load_tokenizer

    start = time.time()
    _say(1, "data: tokenizer, bundled corpus (State of the Union speeches), shards")
    tokenizer_dir = prepare_data(data_root)
    tokenizer = load_tokenizer(tokenizer_dir)

    _say(
        2, "train a paired encoder and decoder, then  [3/7] continue each with the other objective"
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
    tasks = ["intrinsic"] if quick else None
    rows = _cached_eval(out, tasks)
    if rows is None:
        rows = run_suite(
            [models / name for name in STAGES],
            fetch_sotu(),
            out / "eval",
            tasks=tasks,
            quick=True,
            threads=1,
            heldout=heldout_documents(data_root),
        )
        (out / "eval" / "rows.json").write_text(json.dumps({"tasks": tasks, "rows": rows}))

    _say(5, "reload the exports with transformers: fill-mask and generate")
    shown, fills = hf_showcase(out)

    _say(6, "downstream: fine-tune the demo encoder's export as a dense retriever")
    dense = dense_retrieval(out, heldout_documents(data_root), quick=quick)
    if dense is not None:
        print(dense_line(dense))

    _say(7, "report")
    plot = plot_losses(out, out / "loss_curves.png")
    order = out / "demo-encoder" / "data_order.parquet"
    if order.exists():
        shutil.copytree(order, out / "data_order.parquet", dirs_exist_ok=True)
    minutes = (time.time() - start) / 60
    summary = write_summary(out, rows, baselines, shown, plot, minutes, fills=fills, dense=dense)
    print(summary.read_text())
    print(f"report: {out.resolve()}  ({minutes:.1f} min)")
    return out


def _cached_eval(out: Path, tasks: list[str] | None) -> list[dict] | None:
    """The evaluation rows of an earlier run, if it scored these tasks on the current exports."""
    path = out / "eval" / "rows.json"
    if not path.exists():
        return None
    newest = max((out / name / "hf" / "config.json").stat().st_mtime for name in STAGES)
    saved = json.loads(path.read_text())
    if path.stat().st_mtime < newest or saved.get("tasks") != tasks:
        return None
    print("evaluation already done for these exports: reusing eval/ (delete it to redo)")
    return saved["rows"]


def write_summary(
    out: Path,
    rows: list[dict],
    baselines: dict,
    shown: dict,
    plot: Path,
    minutes: float,
    *,
    fills: dict[str, list[dict]] | None = None,
    dense: dict | None = None,
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
    for name, results in (fills or {}).items():
        lines += [f"**{fill_mask_count(name, results)}**", ""]
        lines += ["| | prompt | expected | top-3 (probability) |", "|---|---|---|---|"]
        for r in results:
            top = ", ".join(f"'{t}' {p:.2f}" for t, p in r["top"])
            mark = "+" if r["hit"] else "-"
            lines.append(f"| {mark} | {r['prompt']} | {'/'.join(r['answers'])} | {top} |")
        lines.append("")
    for name, items in shown.items():
        lines.append(f"**{name}**")
        lines.append("")
        lines += [f"- {s}" for s in items]
        lines.append("")
    if dense is not None:
        lines += [
            "## Downstream: the demo encoder as a dense retriever",
            "",
            "`recipes/downstream/dense.py` on the demo encoder's export (sentence-transformers, mean",
            "pooling, MultipleNegativesRankingLoss on the offline retrieval task's training pairs:",
            "a paragraph's first half is the query, its second half the passage), scored on",
            f"{dense.get('limit', 64)} queries of held-out speeches against all their passages:",
            "",
            f"- {dense_line(dense)}",
            "",
        ]
    lines += [
        "Files: `<run>/hf/` (Hugging Face models), `<run>/metrics.jsonl`, `data_order.parquet`",
        "(the sample ids of every step, shared by all four runs), `eval/` (the evaluation table),",
        "`downstream/` (the dense retriever's result and log).",
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
