"""Run tasks x models and write one comparison: results.md, results.csv, results.png.

Each row is one model: its name, kind (encoder / decoder), origin (native, or cross for a
cross-objective continuation), parameter count, then one column per metric. Task names:

| task | columns | what |
|---|---|---|
| intrinsic | mlm_acc mlm_ce clm_acc clm_ce ppl | both objectives' tasks for both kinds; ppl for decoders |
| choice | choice_acc choice_acc_norm | next-sentence multiple choice (log-likelihood / PLL) |
| classify | era_acc era_f1 | paragraph era, fine-tuned pooled head |
| retrieval | retrieval_ndcg10_zeroshot retrieval_ndcg10 | continuation retrieval, contrastive fine-tuning |
| bias | bias_he bias_she bias_they bias_gap | Winogender-style pronoun preference |
| lm-eval[:t1+t2...] | <task>_acc <task>_acc_norm | lm-evaluation-harness tasks (Hub) |
| glue:<name> | glue_<name>_acc glue_<name>_f1 | GLUE fine-tuning (Hub) |
| nanobeir[:d1+d2...] | nanobeir_<d>_ndcg10 | sentence-transformers on MS MARCO, NanoBEIR (Hub) |

The first five are offline (built from the corpus folder); the last three need network access
and `pip install 'ettin[eval]'`.
"""

from __future__ import annotations

import csv
import gc
import math
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import torch

from ettin.eval import HUB_TASKS, OFFLINE_TASKS
from ettin.eval.bias import OCCUPATIONS, build_bias_items, evaluate_bias
from ettin.eval.choice import DEFAULT_LM_EVAL_TASKS, evaluate_choice, run_lm_eval
from ettin.eval.classify import evaluate_classification
from ettin.eval.intrinsic import evaluate_intrinsic
from ettin.eval.models import EvalModel
from ettin.eval.retrieval import (
    NANOBEIR_DEFAULT,
    evaluate_retrieval,
    sentence_transformers_retrieval,
)
from ettin.eval.tasks import FULL, QUICK, Budget, OfflineTasks, build_offline_tasks, glue_task

BASE_COLUMNS = ("model", "kind", "origin", "params")
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "intrinsic": ("mlm_acc", "mlm_ce", "clm_acc", "clm_ce", "ppl"),
    "choice": ("choice_acc", "choice_acc_norm"),
    "classify": ("era_acc", "era_f1"),
    "retrieval": ("retrieval_ndcg10_zeroshot", "retrieval_ndcg10"),
    "bias": ("bias_he", "bias_she", "bias_they", "bias_gap"),
}
LOWER_IS_BETTER = re.compile(r"(_ce|ppl|perplexity)$")
CROSS_NAME = re.compile(
    r"cross|(enc|dec|mlm|clm|encoder|decoder)[-_]from[-_]|from[-_](enc|dec|mlm|clm)"
)


def parse_tasks(tasks: Sequence[str] | str | None) -> list[str]:
    """Task names from a list or a comma-separated string; None means the offline five."""
    if tasks is None:
        return list(OFFLINE_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = [t.strip() for t in tasks if t.strip()]
    for t in out:
        if t not in OFFLINE_TASKS and t.split(":")[0] not in HUB_TASKS:
            raise ValueError(
                f"unknown task {t!r}: choose from {', '.join(OFFLINE_TASKS)}, "
                "lm-eval[:task+task], glue:<name>, nanobeir[:dataset+dataset]"
            )
        if t.startswith("glue") and ":" not in t:
            raise ValueError("name the GLUE task: glue:sst2, glue:mnli, ...")
    return out


def model_origin(source: str | Path) -> str:
    """Return "cross" when the directory name says so (e.g. `...-cross`, `dec-from-enc`), else
    "native". Pass `origins` to `run_suite` (or `--cross` on the command line) to be explicit."""
    return "cross" if CROSS_NAME.search(Path(str(source)).name.lower()) else "native"


def _run_task(
    task: str,
    model: EvalModel,
    source: str | Path,
    offline: OfflineTasks | None,
    budget: Budget,
    seed: int,
) -> dict[str, float]:
    if task == "intrinsic":
        assert offline is not None
        return evaluate_intrinsic(
            model,
            offline.intrinsic_texts,
            seq_len=budget.seq_len,
            num_chunks=budget.intrinsic_chunks,
            clm_positions=budget.clm_positions,
            seed=seed,
        )
    if task == "choice":
        assert offline is not None
        return {f"choice_{k}": v for k, v in evaluate_choice(model, offline.choice).items()}
    if task == "classify":
        assert offline is not None
        metrics = evaluate_classification(
            model,
            offline.classify,
            mode=budget.classify_mode,
            steps=budget.classify_steps,
            max_length=budget.text_len,
            train_embeddings=budget.train_embeddings,
            seed=seed,
        )
        return {f"era_{k}": v for k, v in metrics.items()}
    if task == "retrieval":
        assert offline is not None
        metrics = evaluate_retrieval(
            model,
            offline.retrieval,
            steps=budget.retrieval_steps,
            max_length=budget.text_len,
            train_embeddings=budget.train_embeddings,
            seed=seed,
        )
        return {f"retrieval_{k}": v for k, v in metrics.items()}
    if task == "bias":
        if offline is not None:
            bias_items = offline.bias
        else:
            bias_items = build_bias_items(OCCUPATIONS[: budget.bias_occupations])
        return {f"bias_{k}": v for k, v in evaluate_bias(model, bias_items).items()}
    name, _, arg = task.partition(":")
    if name == "lm-eval":
        names = arg.split("+") if arg else list(DEFAULT_LM_EVAL_TASKS)
        return run_lm_eval(model, names, limit=budget.lm_eval_limit)
    if name == "glue":
        data = glue_task(arg, max_train=budget.glue_limit, max_test=budget.glue_limit)
        steps = max(budget.classify_steps, len(data.train_texts) * 3 // 32)
        metrics = evaluate_classification(
            model, data, steps=steps, batch_size=32, lr=5e-5, seed=seed
        )
        return {f"glue_{arg}_{k}": v for k, v in metrics.items()}
    if name == "nanobeir":
        datasets = arg.split("+") if arg else list(NANOBEIR_DEFAULT)
        return sentence_transformers_retrieval(
            str(source), train_pairs=budget.msmarco_pairs, datasets=datasets
        )
    raise ValueError(f"unknown task {task!r}")


def run_suite(
    model_dirs: Sequence[str | Path],
    corpus_dir: str | Path | None,
    out_dir: str | Path,
    tasks: Sequence[str] | str | None = None,
    quick: bool = False,
    *,
    seed: int = 0,
    device: str | None = None,
    origins: Mapping[str, str] | None = None,
    threads: int | None = None,
    heldout: Collection[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Evaluate every model on every task; write results.md/.csv/.png into `out_dir`.

    `model_dirs`: exported HF directories (or Hub names with network access). `corpus_dir`:
    the speeches folder for the offline tasks (unused if only bias / Hub tasks run). `quick`:
    the small budget of `tasks.QUICK` (the demo). `origins`: model name or path -> "native" /
    "cross", overriding `model_origin`. `threads`: torch CPU threads while evaluating (restored
    after); 1 is often fastest for small models on a CPU shared with other processes. `heldout`:
    the speech file names to score on (e.g. a prepared validation split's documents).
    Returns one dict per model (see the module table)."""
    task_list = parse_tasks(tasks)
    budget = QUICK if quick else FULL
    needs_corpus = any(t in ("intrinsic", "choice", "classify", "retrieval") for t in task_list)
    offline = None
    if needs_corpus:
        if corpus_dir is None:
            raise ValueError("the offline tasks need a corpus folder (--corpus)")
        offline = build_offline_tasks(corpus_dir, budget, seed, heldout)
        log("eval data: " + "; ".join(f"{k}: {v}" for k, v in offline.counts.items()))
    rows = []
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for source in model_dirs:
            rows.append(
                _evaluate_model(source, task_list, offline, budget, seed, device, origins, log)
            )
    finally:
        torch.set_num_threads(previous_threads)
    write_results(rows, out_dir, notes=offline.counts if offline else None, quick=quick)
    return rows


def _evaluate_model(
    source: str | Path,
    task_list: Sequence[str],
    offline: OfflineTasks | None,
    budget: Budget,
    seed: int,
    device: str | None,
    origins: Mapping[str, str] | None,
    log: Callable[[str], None],
) -> dict:
    started = time.perf_counter()
    model = EvalModel.load(source, device=device)
    origins = origins or {}
    origin = origins.get(model.name) or origins.get(str(source)) or model_origin(source)
    row: dict = {
        "model": model.name,
        "kind": model.kind,
        "origin": origin,
        "params": model.num_parameters(),
    }
    for task in task_list:
        t0 = time.perf_counter()
        metrics = _run_task(task, model, source, offline, budget, seed)
        row.update(metrics)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        log(f"eval {model.name} [{model.kind}] {task}: {shown} ({time.perf_counter() - t0:.1f}s)")
    row["seconds"] = round(time.perf_counter() - started, 1)
    del model
    gc.collect()
    return row


# --------------------------------------------------------------------------- outputs


def metric_columns(rows: Sequence[Mapping]) -> list[str]:
    """Metric columns in task order, then any others in first-seen order."""
    seen: list[str] = []
    for r in rows:
        for key in r:
            if key not in BASE_COLUMNS and key != "seconds" and key not in seen:
                seen.append(key)
    known = [c for cols in METRIC_COLUMNS.values() for c in cols if c in seen]
    return known + [c for c in seen if c not in known]


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, int) and value >= 1_000_000:
        return f"{value / 1e6:.1f}M"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> list[str]:
    """The lines of a Markdown table of `columns` (missing or NaN shown as –)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|"
        + "|".join("---" if c in ("model", "kind", "origin") else "---:" for c in columns)
        + "|",
    ]
    for r in rows:
        cells = ["–" if _missing(r.get(c)) else _fmt(r.get(c)) for c in columns]
        if columns[-1] == "seconds" and "seconds" in r:
            cells[-1] = f"{r['seconds']:.1f}"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _order(rows: Sequence[Mapping]) -> list[Mapping]:
    """By size, then encoders before decoders, native before cross: pairs side by side."""
    return sorted(
        rows,
        key=lambda r: (
            r.get("params", 0),
            r["kind"] != "encoder",
            r.get("origin") != "native",
            r["model"],
        ),
    )


def write_results(
    rows: Sequence[Mapping],
    out_dir: str | Path,
    notes: Mapping[str, str] | None = None,
    quick: bool = False,
) -> dict[str, Path]:
    """results.csv (every column, full precision), results.md (a table and notes), results.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _order(rows)
    metrics = metric_columns(rows)
    columns = [*BASE_COLUMNS, *metrics, "seconds"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if _missing(r.get(c)) else _csv_value(r.get(c)) for c in columns])
    text = ["# Evaluation: encoders and decoders side by side", ""]
    text += markdown_table(rows, columns)
    text += [
        "",
        "Accuracies, F1, nDCG@10 and bias shares are fractions in [0, 1]; _ce is cross-entropy "
        "(nats/token) and ppl perplexity (lower is better); bias_gap = share(he) - share(she). "
        "See docs/eval.md for how each score is computed.",
    ]
    if notes:
        budget = "quick" if quick else "full"
        text += [
            "",
            f"Offline data ({budget} budget): "
            + "; ".join(f"{k}: {v}" for k, v in notes.items())
            + ".",
        ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    plot_results(rows, metrics, out / "results.png")
    return {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}


def _csv_value(value):
    return round(value, 6) if isinstance(value, float) else value


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


KIND_COLORS = {"encoder": "#1f77b4", "decoder": "#ff7f0e"}


def plot_results(rows: Sequence[Mapping], metrics: Sequence[str], path: str | Path) -> Path:
    """One panel per metric; a bar per model, ordered by size then kind, coloured by kind,
    hatched when cross-objective, so each encoder/decoder pair stands side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = _order(rows)
    shown = [m for m in metrics if any(not _missing(r.get(m)) for r in rows)] or ["params"]
    cols = min(4, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows + 0.6), squeeze=False)
    labels = [f"{r['model']}\n{_fmt(r.get('params', 0))}" for r in rows]
    for ax, metric in zip(axes.flat, shown, strict=False):
        values = [float("nan") if _missing(r.get(metric)) else float(r[metric]) for r in rows]
        for x, (r, v) in enumerate(zip(rows, values, strict=True)):
            if not math.isnan(v):
                ax.bar(
                    x,
                    v,
                    color=KIND_COLORS.get(r["kind"], "grey"),
                    hatch="//" if r.get("origin") == "cross" else None,
                    edgecolor="black",
                    linewidth=0.5,
                )
        if metric.endswith(("ppl", "perplexity")):  # bars from 1: height = log ppl = CE
            ax.set_yscale("log")
            ax.set_ylim(1, 2 * max([v for v in values if not math.isnan(v)], default=1))
        arrow = " (lower better)" if LOWER_IS_BETTER.search(metric) else ""
        ax.set_title(metric + arrow, fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    legend = [
        Patch(facecolor=KIND_COLORS["encoder"], label="encoder"),
        Patch(facecolor=KIND_COLORS["decoder"], label="decoder"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="cross-objective"),
    ]
    fig.legend(handles=legend, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.8 * nrows + 0.6)))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
