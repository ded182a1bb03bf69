"""Reranker with sentence-transformers' CrossEncoder (binary cross-entropy on pairs).

    python recipes/downstream/rerank.py runs/demo/demo-encoder/hf --steps 60

Trains `[CLS] query [SEP] passage [SEP]` -> relevant? on the offline retrieval pairs (the true
continuation vs another paragraph's) and prints held-out nDCG@10 of reranking each query's true
passage among 10 candidates, before and after.
"""

from __future__ import annotations

import random

from ettin.eval.downstream import cli, report, retrieval_split, trainer_args, with_negatives


def run(
    model: str,
    steps: int = 60,
    batch_size: int = 16,
    limit: int = 64,
    out=None,
    corpus=None,
    seed: int = 0,
) -> dict:
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    pairs, queries, passages, qrels = retrieval_split(corpus, limit)
    ce = CrossEncoder(model, num_labels=1, max_length=128)  # a new 1-logit classification head
    rng = random.Random(seed)
    samples = []
    for q, text in queries.items():
        positive = passages[next(iter(qrels[q]))]
        pool = [p for p in passages.values() if p != positive]
        others = rng.sample(pool, min(9, len(pool)))
        samples.append({"query": text, "positive": [positive], "documents": [positive, *others]})
    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, name="sotu")
    before = evaluator(ce)[evaluator.primary_metric]
    rows = {"query": [], "passage": [], "label": []}
    for q, pos, neg in with_negatives(pairs, seed):
        rows["query"] += [q, q]
        rows["passage"] += [pos, neg]
        rows["label"] += [1.0, 0.0]
    args = CrossEncoderTrainingArguments(**trainer_args(out, steps, batch_size, seed))
    CrossEncoderTrainer(
        model=ce, args=args, train_dataset=Dataset.from_dict(rows), loss=BinaryCrossEntropyLoss(ce)
    ).train()
    after = evaluator(ce)[evaluator.primary_metric]
    if out is not None:
        ce.save_pretrained(str(out))
    return report("reranker (CrossEncoder)", evaluator.primary_metric, before, after)


if __name__ == "__main__":
    cli(__doc__, run)
