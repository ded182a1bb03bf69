"""Sequence classification by fine-tuning a pooled classification head.

Each text (or text pair) is encoded as the models saw documents in training,
`[CLS] text [SEP]` (pairs: `[CLS] a [SEP] b [SEP]`), for both kinds. The backbone's last
hidden states are pooled into one vector:

- encoders: mean over the real tokens (default) or the [CLS] vector;
- decoders: the last real token, the only one that has seen the whole input.

A linear head maps the vector to the labels. Two regimes:

- `finetune`: backbone and head trained together with AdamW and cross-entropy (GLUE style);
  the backbone's weights are restored afterwards, so every task starts from the same model;
- `probe`: the backbone is frozen, its pooled features computed once, standardised, and only the
  head trained (full batch). Much cheaper; a measure of what the representation already holds.

This is a small torch loop of our own rather than the HF Trainer or Composer: it runs offline,
has no optional dependency, treats both kinds identically and costs a few seconds on CPU for a
demo-size model. GLUE runs use the same loop (`tasks.glue_task` provides the data).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ettin.eval.models import EvalModel, Kind, length_batches, pad_rows

Pooling = Literal["mean", "cls", "last"]
Text = str | tuple[str, str]


@dataclass
class ClassificationData:
    """Train and test texts with integer labels; `label_names[i]` names label i."""

    train_texts: list[Text]
    train_labels: list[int]
    test_texts: list[Text]
    test_labels: list[int]
    label_names: list[str]


def default_pooling(kind: Kind) -> Pooling:
    return "mean" if kind == "encoder" else "last"


def pool(hidden: Tensor, attention_mask: Tensor, mode: Pooling) -> Tensor:
    """(B, S, H) hidden states -> (B, H): mean of real tokens, the first token, or the last
    real token (rows are right-padded)."""
    mask = attention_mask.to(hidden.device)
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    raise ValueError(f"pooling must be mean, cls or last, not {mode!r}")


def encode_texts(model: EvalModel, texts: Sequence[Text], max_length: int) -> list[list[int]]:
    """Token rows `[CLS] text [SEP]` (or `[CLS] a [SEP] b [SEP]`), each text cut to fit."""
    start, end = model.start_ids, model.end_ids
    rows = []
    for text in texts:
        if isinstance(text, tuple):
            a, b = (model.tokenize(t) for t in text)
            room = max_length - len(start) - 2 * len(end)
            half = max(room // 2, room - len(b))
            a = a[:half]
            rows.append([*start, *a, *end, *b[: room - len(a)], *end])
        else:
            ids = model.tokenize(text)[: max_length - len(start) - len(end)]
            rows.append([*start, *ids, *end])
    return rows


def embed_rows(
    model: EvalModel, rows: Sequence[Sequence[int]], pooling: Pooling, max_tokens: int = 16384
) -> Tensor:
    """Pooled vectors (N, H) for token rows, without gradients."""
    out: list[Tensor | None] = [None] * len(rows)
    with torch.inference_mode():
        for batch in length_batches([len(r) for r in rows], max_tokens):
            ids, mask = pad_rows([rows[i] for i in batch], model.pad_id)
            vectors = pool(model.hidden(ids, mask), mask, pooling).float().cpu()
            for j, i in enumerate(batch):
                out[i] = vectors[j]
    return torch.stack(out)  # type: ignore[arg-type]


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global generator (head init, shuffles) without leaking the state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _probe(
    train_x: Tensor, train_y: Tensor, num_labels: int, steps: int, lr: float
) -> tuple[nn.Linear, Tensor, Tensor]:
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant in train: leave as is
    head = nn.Linear(train_x.shape[1], num_labels)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2, foreach=True)
    x = (train_x - mean) / std
    for _ in range(steps):
        loss = F.cross_entropy(head(x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head, mean, std


def evaluate_classification(
    model: EvalModel,
    data: ClassificationData,
    *,
    mode: Literal["finetune", "probe"] = "finetune",
    pooling: Pooling | None = None,
    steps: int = 60,
    batch_size: int = 16,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    max_length: int = 128,
    train_embeddings: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tune (or probe) on the train split and return test `acc` and macro `f1`.

    `train_embeddings=False` keeps the token embedding matrix frozen (most of a small model's
    parameters; freezing it makes a CPU fine-tuning step several times cheaper)."""
    pooling = pooling or default_pooling(model.kind)
    num_labels = len(data.label_names)
    train_rows = encode_texts(model, data.train_texts, max_length)
    test_rows = encode_texts(model, data.test_texts, max_length)
    train_y = torch.tensor(data.train_labels, dtype=torch.long)
    with seeded(seed):
        if mode == "probe":
            head, mean, std = _probe(
                embed_rows(model, train_rows, pooling), train_y, num_labels, steps, lr=1e-2
            )
            with torch.no_grad():
                logits = head((embed_rows(model, test_rows, pooling) - mean) / std)
            return classification_metrics(logits.argmax(-1), data.test_labels, num_labels)
        with model.restored():
            head = nn.Linear(model.hidden_size, num_labels).to(model.device)
            opt = torch.optim.AdamW(
                [
                    {"params": list(model.parameters(train_embeddings)), "lr": lr},
                    {"params": list(head.parameters()), "lr": head_lr},
                ],
                weight_decay=1e-2,
                foreach=True,
            )
            model.train()
            order = torch.randperm(len(train_rows))
            for step in range(steps):
                idx = order[[(step * batch_size + j) % len(order) for j in range(batch_size)]]
                ids, mask = pad_rows([train_rows[i] for i in idx], model.pad_id)
                logits = head(pool(model.hidden(ids, mask), mask, pooling))
                loss = F.cross_entropy(logits.float(), train_y[idx].to(logits.device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.train(False)
            with torch.no_grad():
                features = embed_rows(model, test_rows, pooling)
                predictions = head.cpu()(features).argmax(-1)
        return classification_metrics(predictions, data.test_labels, num_labels)


def classification_metrics(
    predictions: Tensor, labels: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean F1 of the labels that occur in labels or predictions)."""
    y = torch.tensor(list(labels), dtype=torch.long)
    acc = float((predictions == y).float().mean()) if len(y) else math.nan
    f1s = []
    for c in range(num_labels):
        tp = int(((predictions == c) & (y == c)).sum())
        fp = int(((predictions == c) & (y != c)).sum())
        fn = int(((predictions != c) & (y == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"acc": acc, "f1": sum(f1s) / len(f1s) if f1s else math.nan}
