"""Dense bi-encoder retrieval with sentence-transformers (MultipleNegativesRankingLoss).

    python recipes/downstream/dense.py runs/demo/demo-encoder/hf --steps 60

Fine-tunes mean-pooled embeddings on the offline retrieval task (a paragraph's first half is the
query, its second half the passage) and prints nDCG@10 on held-out speeches before and after.
"""

from __future__ import annotations

from ettin.eval.downstream import cli, report, retrieval_split, trainer_args


def run(
    model: str,
    steps: int = 60,
    batch_size: int = 16,
    limit: int = 64,
    out=None,
    corpus=None,
    seed: int = 0,
    heldout=None,
) -> dict:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    pairs, queries, passages, qrels = retrieval_split(corpus, limit, heldout)
    st = SentenceTransformer(model)  # a bare HF model: Transformer + mean pooling
    st.max_seq_length = min(st.max_seq_length or 128, 128)
    relevant = {q: set(docs) for q, docs in qrels.items()}
    evaluator = InformationRetrievalEvaluator(queries, passages, relevant, name="sotu")
    before = evaluator(st)[evaluator.primary_metric]  # sotu_cosine_ndcg@10
    train = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    args = SentenceTransformerTrainingArguments(**trainer_args(out, steps, batch_size, seed))
    SentenceTransformerTrainer(
        model=st, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(st)
    ).train()
    after = evaluator(st)[evaluator.primary_metric]
    if out is not None:
        st.save(str(out))
    return report("dense bi-encoder (MultipleNegativesRankingLoss)", "nDCG@10", before, after)


if __name__ == "__main__":
    cli(__doc__, run)
