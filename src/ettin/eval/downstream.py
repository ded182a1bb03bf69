"""Shared by the downstream recipes (`recipes/downstream/*.py`): command line, the offline tasks,
and the printed figures.

Every recipe takes a model folder written by `ettin export` (or a Hub name such as
`jhu-clsp/ettin-encoder-150m` where the Hub is reachable: the same code path) and uses the
offline tasks built from the bundled State of the Union speeches (`ettin.eval.tasks`).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any


def cli(description: str, run: Callable[..., dict[str, Any]], **defaults: Any) -> None:
    """Parse `--model --steps --batch-size --limit --out --corpus --seed` and call `run`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model", help="exported model folder, or a Hub name (jhu-clsp/ettin-...)")
    p.add_argument("--steps", type=int, default=defaults.get("steps", 60), help="training steps")
    p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 16))
    p.add_argument(
        "--limit", type=int, default=defaults.get("limit", 64), help="test examples to score"
    )
    p.add_argument("--out", type=Path, default=None, help="where to save the fine-tuned model")
    p.add_argument("--corpus", default=None, help="speech folder (default: the bundled corpus)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    run(**vars(args))


def offline_tasks(corpus: str | Path | None = None, heldout: Collection[str] | None = None):
    """The QUICK budget of `ettin.eval.tasks.build_offline_tasks` on the bundled speeches.

    `heldout`: the speech files to test on (e.g. the ones a model never trained on; the demo
    passes its validation split's); default: the tasks' own every-4th-speech split."""
    from ettin.eval.tasks import QUICK, build_offline_tasks
    from ettin.prep.corpus import fetch_sotu

    return build_offline_tasks(corpus or fetch_sotu(), QUICK, heldout=heldout)


def retrieval_split(corpus=None, limit: int = 64, heldout: Collection[str] | None = None):
    """(train pairs, test queries, test passages, qrels), the test side cut to `limit` queries."""
    data = offline_tasks(corpus, heldout).retrieval
    keep = list(data.queries)[:limit]
    queries = {q: data.queries[q] for q in keep}
    passages = {f"p{q[1:]}": data.passages[f"p{q[1:]}"] for q in keep}
    qrels = {q: data.qrels[q] for q in keep}
    return data.train_pairs, queries, passages, qrels


def with_negatives(pairs: Sequence[tuple[str, str]], seed: int = 0) -> list[tuple[str, str, str]]:
    """(query, positive, negative) triplets: the negative is another pair's passage."""
    rng = random.Random(seed)
    out = []
    for i, (q, p) in enumerate(pairs):
        j = rng.randrange(len(pairs) - 1)
        out.append((q, p, pairs[j + (j >= i)][1]))
    return out


def report(title: str, metric: str, before: float, after: float, **extra: Any) -> dict[str, Any]:
    print(f"{title}: {metric} {before:.4f} -> {after:.4f} (before -> after)")
    return {"metric": metric, "before": before, "after": after, **extra}


def trainer_args(out: Path | None, steps: int, batch_size: int, seed: int, **kw: Any) -> dict:
    """Common keyword arguments of the HF-style TrainingArguments used by the recipes."""
    import tempfile

    return dict(
        output_dir=str(out or Path(tempfile.mkdtemp(prefix="ettin-downstream-"))),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=kw.pop("learning_rate", 1e-4),
        warmup_ratio=0.1,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not _cuda(),
        **kw,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
