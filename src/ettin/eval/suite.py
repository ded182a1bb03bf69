"""Run tasks x models and write one comparison: results.md, results.csv, results.png.

Each row is one model: its name, kind (encoder / decoder), origin (native, or cross for a
cross-objective continuation, read from the lineage the export records), parameter count, then
one column per metric. Every task is one row of `TASKS` below: its name, its columns, what it
needs, and the function that runs it. The offline ones are built from the corpus folder; the
Hub ones need network access and `pip install 'ettin[eval]'`. This module imports only the
standard library at the top so that `ettin --help` stays fast; the scorers load when run.
"""

from __future__ import annotations

import csv
import gc
import math
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ettin.errors import UsageError


@dataclass(frozen=True)
class Context:
    """What a task runner gets besides the model: the data, the budget, the seed."""

    source: str | Path  # the model's folder or Hub name
    offline: Any  # ettin.eval.tasks.OfflineTasks, or None when no task needs the corpus
    budget: Any  # ettin.eval.tasks.Budget
    seed: int
    arg: str  # what follows "name:" in the task name (Hub tasks)


def _intrinsic(model, c: Context) -> dict[str, float]:
    from ettin.eval.intrinsic import evaluate_intrinsic

    b = c.budget
    return evaluate_intrinsic(
        model,
        c.offline.intrinsic_texts,
        seq_len=b.seq_len,
        num_chunks=b.intrinsic_chunks,
        clm_positions=b.clm_positions,
        seed=c.seed,
    )


def _choice(model, c: Context) -> dict[str, float]:
    from ettin.eval.choice import evaluate_choice

    return {f"choice_{k}": v for k, v in evaluate_choice(model, c.offline.choice).items()}


def _classify(model, c: Context) -> dict[str, float]:
    from ettin.eval.classify import evaluate_classification

    b = c.budget
    metrics = evaluate_classification(
        model,
        c.offline.classify,
        mode=b.classify_mode,
        steps=b.classify_steps,
        max_length=b.text_len,
        train_embeddings=b.train_embeddings,
        seed=c.seed,
    )
    return {f"era_{k}": v for k, v in metrics.items()}


def _retrieval(model, c: Context) -> dict[str, float]:
    from ettin.eval.retrieval import evaluate_retrieval

    b = c.budget
    metrics = evaluate_retrieval(
        model,
        c.offline.retrieval,
        steps=b.retrieval_steps,
        max_length=b.text_len,
        train_embeddings=b.train_embeddings,
        seed=c.seed,
    )
    return {f"retrieval_{k}": v for k, v in metrics.items()}


def _bias(model, c: Context) -> dict[str, float]:
    from ettin.eval.bias import OCCUPATIONS, build_bias_items, evaluate_bias

    items = c.offline.bias if c.offline is not None else None
    items = items or build_bias_items(OCCUPATIONS[: c.budget.bias_occupations])
    return {f"bias_{k}": v for k, v in evaluate_bias(model, items).items()}


def _lm_eval(model, c: Context) -> dict[str, float]:
    from ettin.eval.choice import DEFAULT_LM_EVAL_TASKS, run_lm_eval

    names = c.arg.split("+") if c.arg else list(DEFAULT_LM_EVAL_TASKS)
    return run_lm_eval(model, names, limit=c.budget.lm_eval_limit)


def _glue(model, c: Context) -> dict[str, float]:
    from ettin.eval.classify import evaluate_classification
    from ettin.eval.tasks import glue_task

    data = glue_task(c.arg, max_train=c.budget.glue_limit, max_test=c.budget.glue_limit)
    steps = max(c.budget.classify_steps, len(data.train_texts) * 3 // 32)
    metrics = evaluate_classification(model, data, steps=steps, batch_size=32, lr=5e-5, seed=c.seed)
    return {f"glue_{c.arg}_{k}": v for k, v in metrics.items()}


def _nanobeir(model, c: Context) -> dict[str, float]:
    from ettin.eval.retrieval import NANOBEIR_DEFAULT, sentence_transformers_retrieval

    datasets = c.arg.split("+") if c.arg else list(NANOBEIR_DEFAULT)
    return sentence_transformers_retrieval(
        str(c.source), train_pairs=c.budget.msmarco_pairs, datasets=datasets
    )


@dataclass(frozen=True)
class Task:
    """One evaluation task: everything about it in one place."""

    name: str
    columns: tuple[str, ...]  # its metric columns (Hub tasks: a pattern; they depend on `arg`)
    what: str
    run: Callable[[Any, Context], dict[str, float]]
    corpus: bool = False  # built from the speeches folder
    hub: bool = False  # needs network access and `pip install 'ettin[eval]'`
    arg: str = ""  # the argument the name takes after ':' ("" = none); `required` if it must
    required: bool = False


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "intrinsic",
            ("mlm_acc", "mlm_ce", "clm_acc", "clm_ce", "ppl"),
            "both objectives' tasks for both kinds; ppl for decoders",
            _intrinsic,
            corpus=True,
        ),
        Task(
            "choice",
            ("choice_acc", "choice_acc_norm"),
            "next-sentence multiple choice (log-likelihood / PLL)",
            _choice,
            corpus=True,
        ),
        Task(
            "classify",
            ("era_acc", "era_f1"),
            "paragraph era, fine-tuned pooled head",
            _classify,
            corpus=True,
        ),
        Task(
            "retrieval",
            ("retrieval_ndcg10_zeroshot", "retrieval_ndcg10"),
            "continuation retrieval, contrastive fine-tuning",
            _retrieval,
            corpus=True,
        ),
        Task(
            "bias",
            ("bias_he", "bias_she", "bias_they", "bias_gap"),
            "Winogender-style pronoun preference",
            _bias,
        ),
        Task(
            "lm-eval",
            ("<task>_acc", "<task>_acc_norm"),
            "lm-evaluation-harness tasks",
            _lm_eval,
            hub=True,
            arg="task+task",
        ),
        Task(
            "glue",
            ("glue_<name>_acc", "glue_<name>_f1"),
            "GLUE fine-tuning",
            _glue,
            hub=True,
            arg="name",
            required=True,
        ),
        Task(
            "nanobeir",
            ("nanobeir_<d>_ndcg10",),
            "sentence-transformers on MS MARCO, NanoBEIR",
            _nanobeir,
            hub=True,
            arg="dataset+dataset",
        ),
    )
}
OFFLINE_TASKS = tuple(name for name, t in TASKS.items() if not t.hub)
HUB_TASKS = tuple(name for name, t in TASKS.items() if t.hub)
METRIC_COLUMNS = {name: t.columns for name, t in TASKS.items() if not t.hub}
BASE_COLUMNS = ("model", "kind", "origin", "params")
LOWER_IS_BETTER = re.compile(r"(_ce|ppl|perplexity)$")


def parse_tasks(tasks: Sequence[str] | str | None) -> list[str]:
    """Task names from a list or a comma-separated string; None means the offline five."""
    if tasks is None:
        return list(OFFLINE_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = [t.strip() for t in tasks if t.strip()]
    for name in out:
        base, _, arg = name.partition(":")
        task = TASKS.get(base)
        if task is None or (arg and not task.arg):
            usage = ", ".join(f"{n}:{t.arg}" if t.arg else n for n, t in TASKS.items())
            raise UsageError(f"unknown task {name!r}: choose from {usage}")
        if task.required and not arg:
            raise UsageError(f"name the {base} task's {task.arg}: {base}:<{task.arg}>")
    return out


def model_origin(lineage: Sequence[str]) -> str:
    """ "cross" when the model's lineage (the objectives of its run and every run it started
    from, as the export records them) holds both objectives, else "native"."""
    return "cross" if len(set(lineage)) > 1 else "native"


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
    "cross", overriding the lineage the export records. `threads`: torch CPU threads while
    evaluating (restored after); 1 is often fastest for small models on a CPU shared with other
    processes. `heldout`: the speech file names to score on (e.g. a prepared validation split's
    documents). Returns one dict per model (see `TASKS`)."""
    import torch

    from ettin.eval.tasks import FULL, QUICK, build_offline_tasks

    task_list = parse_tasks(tasks)
    budget = QUICK if quick else FULL
    offline = None
    if any(TASKS[t.partition(":")[0]].corpus for t in task_list):
        if corpus_dir is None:
            raise UsageError("the offline tasks need a corpus folder (--corpus)")
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
    offline: Any,
    budget: Any,
    seed: int,
    device: str | None,
    origins: Mapping[str, str] | None,
    log: Callable[[str], None],
) -> dict:
    from ettin.eval.models import EvalModel

    started = time.perf_counter()
    model = EvalModel.load(source, device=device)
    origins = origins or {}
    origin = origins.get(model.name) or origins.get(str(source)) or model_origin(model.lineage)
    row: dict = {
        "model": model.name,
        "kind": model.kind,
        "origin": origin,
        "params": model.num_parameters(),
    }
    for name in task_list:
        t0 = time.perf_counter()
        base, _, arg = name.partition(":")
        metrics = TASKS[base].run(model, Context(source, offline, budget, seed, arg))
        row.update(metrics)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        log(f"eval {model.name} [{model.kind}] {name}: {shown} ({time.perf_counter() - t0:.1f}s)")
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
