"""Late interaction (ColBERT) with PyLate: one vector per token, MaxSim scoring.

    python recipes/downstream/colbert.py runs/demo/demo-encoder/hf --steps 60

Adds PyLate's projection layer and query/document markers to the exported model, trains with its
contrastive loss on (query, positive, negative) triplets from the offline retrieval task, and
prints held-out triplet accuracy (MaxSim(query, positive) > MaxSim(query, negative)) before and
after.
"""

from __future__ import annotations

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
    from pylate import evaluation, losses, models, utils
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    pairs, queries, passages, qrels = retrieval_split(corpus, limit)
    colbert = models.ColBERT(model_name_or_path=model, document_length=128, query_length=32)
    test = with_negatives([(queries[q], passages[next(iter(qrels[q]))]) for q in queries], seed + 1)
    evaluator = evaluation.ColBERTTripletEvaluator(
        anchors=[t[0] for t in test],
        positives=[t[1] for t in test],
        negatives=[t[2] for t in test],
        name="sotu",
    )
    before = evaluator(colbert)[evaluator.primary_metric]
    triplets = with_negatives(pairs, seed)
    train = Dataset.from_dict(
        {
            "query": [t[0] for t in triplets],
            "positive": [t[1] for t in triplets],
            "negative": [t[2] for t in triplets],
        }
    )
    args = SentenceTransformerTrainingArguments(**trainer_args(out, steps, batch_size, seed))
    SentenceTransformerTrainer(
        model=colbert,
        args=args,
        train_dataset=train,
        loss=losses.Contrastive(model=colbert),
        data_collator=utils.ColBERTCollator(colbert.tokenize),
    ).train()
    after = evaluator(colbert)[evaluator.primary_metric]
    if out is not None:
        colbert.save(str(out))
    return report("ColBERT (PyLate)", "triplet accuracy", before, after)


if __name__ == "__main__":
    cli(__doc__, run)
