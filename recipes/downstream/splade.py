"""Learned sparse retrieval (SPLADE) with sentence-transformers' SparseEncoder.

    python recipes/downstream/splade.py runs/demo/demo-encoder/hf --steps 60

An encoder's masked-LM head gives each text a vocabulary-sized sparse vector (max-pooled
log(1 + ReLU(logits))); SpladeLoss = in-batch contrastive loss + FLOPS regularisers. Prints
held-out nDCG@10 before and after. Encoders only (SPLADE needs the masked-LM head).
"""

from __future__ import annotations

import json
from pathlib import Path

from ettin.eval.downstream import cli, report, retrieval_split, trainer_args


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
    from sentence_transformers.sparse_encoder import (
        SparseEncoder,
        SparseEncoderTrainer,
        SparseEncoderTrainingArguments,
    )
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator
    from sentence_transformers.sparse_encoder.losses import (
        SparseMultipleNegativesRankingLoss,
        SpladeLoss,
    )
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    config = Path(model) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") != "modernbert":
        raise SystemExit(f"{model}: SPLADE needs an encoder (masked-LM head); this is a decoder")
    pairs, queries, passages, qrels = retrieval_split(corpus, limit)
    mlm = MLMTransformer(model, max_seq_length=128)
    sparse = SparseEncoder(modules=[mlm, SpladePooling(pooling_strategy="max")])
    relevant = {q: set(docs) for q, docs in qrels.items()}
    evaluator = SparseInformationRetrievalEvaluator(queries, passages, relevant, name="sotu")
    before = evaluator(sparse)[evaluator.primary_metric]
    loss = SpladeLoss(
        sparse,
        loss=SparseMultipleNegativesRankingLoss(sparse),
        query_regularizer_weight=5e-5,
        document_regularizer_weight=3e-5,
    )
    train = Dataset.from_dict({"query": [q for q, _ in pairs], "passage": [p for _, p in pairs]})
    args = SparseEncoderTrainingArguments(**trainer_args(out, steps, batch_size, seed))
    SparseEncoderTrainer(model=sparse, args=args, train_dataset=train, loss=loss).train()
    after = evaluator(sparse)[evaluator.primary_metric]
    if out is not None:
        sparse.save(str(out))
    return report("SPLADE (SparseEncoder)", "nDCG@10", before, after)


if __name__ == "__main__":
    cli(__doc__, run)
