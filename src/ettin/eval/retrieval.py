"""Dense retrieval: fine-tune a pooled embedding on query/passage pairs, score nDCG@10.

Offline path (no optional dependency): texts are encoded `[CLS] text [SEP]`, mean-pooled over
real tokens for both kinds (sentence-transformers' default, and the same footing for encoders
and decoders) and L2-normalised. Fine-tuning minimises the in-batch contrastive loss
(InfoNCE, the loss sentence-transformers calls MultipleNegativesRankingLoss): each query must
score its own passage above the other passages of the batch, cosine similarity / 0.05. Every
query of the test split is then ranked against all test passages by cosine similarity.

Hub path: `sentence_transformers_retrieval` fine-tunes the exported model with
sentence-transformers on MS MARCO triplets and scores NanoBEIR (nDCG@10), the standard tools
for the Ettin-style comparison; it needs `pip install 'ettin[eval]'` and network access.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ettin.eval.classify import Pooling, embed_rows, encode_texts, pool, seeded
from ettin.eval.models import EvalModel, pad_rows


@dataclass
class RetrievalData:
    """Training pairs, and a test set: queries, passages and graded relevance (qrels)."""

    train_pairs: list[tuple[str, str]]
    queries: dict[str, str]
    passages: dict[str, str]
    qrels: dict[str, dict[str, float]]


def ndcg_at_k(ranking: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k with linear gains (as BEIR / pytrec_eval): sum rel_i / log2(i + 1) over the
    top k ranks i = 1..k, divided by the same sum for the ideal ordering."""
    dcg = sum(relevance.get(doc, 0.0) / math.log2(i + 2) for i, doc in enumerate(ranking[:k]))
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def rank_passages(
    query_vectors: torch.Tensor, passage_vectors: torch.Tensor, k: int
) -> torch.Tensor:
    """Indices (Q, k) of the top-k passages per query by cosine similarity."""
    q = F.normalize(query_vectors.float(), dim=-1)
    p = F.normalize(passage_vectors.float(), dim=-1)
    return (q @ p.T).topk(min(k, len(p)), dim=-1).indices


def score_retrieval(
    model: EvalModel,
    data: RetrievalData,
    pooling: Pooling = "mean",
    max_length: int = 128,
    k: int = 10,
) -> float:
    """Mean nDCG@k over the test queries."""
    qids, pids = list(data.queries), list(data.passages)
    q = embed_rows(model, encode_texts(model, [data.queries[i] for i in qids], max_length), pooling)
    p = embed_rows(
        model, encode_texts(model, [data.passages[i] for i in pids], max_length), pooling
    )
    top = rank_passages(q, p, k)
    scores = [
        ndcg_at_k([pids[j] for j in top[n].tolist()], data.qrels.get(qid, {}), k)
        for n, qid in enumerate(qids)
    ]
    return sum(scores) / len(scores) if scores else math.nan


def finetune_embedder(
    model: EvalModel,
    pairs: Sequence[tuple[str, str]],
    *,
    pooling: Pooling = "mean",
    steps: int = 40,
    batch_size: int = 16,
    lr: float = 1e-4,
    temperature: float = 0.05,
    max_length: int = 128,
    train_embeddings: bool = True,
    seed: int = 0,
) -> list[float]:
    """Train the backbone with the in-batch contrastive loss; returns the loss per step
    (`train_embeddings=False` freezes the token embedding matrix)."""
    queries = encode_texts(model, [q for q, _ in pairs], max_length)
    passages = encode_texts(model, [p for _, p in pairs], max_length)
    params = list(model.parameters(train_embeddings))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=True)
    losses = []
    model.train()
    with seeded(seed):
        order = torch.randperm(len(pairs)).tolist()
        for step in range(steps):
            # Distinct pairs in a batch: a duplicate would be a false negative.
            idx = list(
                dict.fromkeys(
                    order[(step * batch_size + j) % len(order)] for j in range(batch_size)
                )
            )
            q_ids, q_mask = pad_rows([queries[i] for i in idx], model.pad_id)
            p_ids, p_mask = pad_rows([passages[i] for i in idx], model.pad_id)
            q = F.normalize(pool(model.hidden(q_ids, q_mask), q_mask, pooling).float(), dim=-1)
            p = F.normalize(pool(model.hidden(p_ids, p_mask), p_mask, pooling).float(), dim=-1)
            logits = q @ p.T / temperature
            loss = F.cross_entropy(logits, torch.arange(len(idx), device=logits.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    model.train(False)
    return losses


def evaluate_retrieval(
    model: EvalModel,
    data: RetrievalData,
    *,
    pooling: Pooling = "mean",
    steps: int = 40,
    batch_size: int = 16,
    lr: float = 1e-4,
    max_length: int = 128,
    train_embeddings: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """`ndcg10_zeroshot` (pooled states as they are) and `ndcg10` (after fine-tuning); the
    model's weights are restored afterwards."""
    zero = score_retrieval(model, data, pooling, max_length)
    with model.restored():
        finetune_embedder(
            model,
            data.train_pairs,
            pooling=pooling,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            max_length=max_length,
            train_embeddings=train_embeddings,
            seed=seed,
        )
        tuned = score_retrieval(model, data, pooling, max_length)
    return {"ndcg10_zeroshot": zero, "ndcg10": tuned}


# --------------------------------------------------------------------------- Hub path

MSMARCO_TRIPLETS = "sentence-transformers/msmarco-msmarco-distilbert-base-tas-b"
NANOBEIR_DEFAULT = ("msmarco", "nfcorpus", "scifact", "fiqa2018", "arguana", "nq")


def sentence_transformers_retrieval(
    model_dir: str,
    *,
    pooling: str = "mean",
    train_pairs: int = 100_000,
    datasets: Sequence[str] = NANOBEIR_DEFAULT,
    out_dir: str | None = None,
    batch_size: int = 64,
    lr: float = 8e-5,
    max_seq_length: int = 256,
) -> dict[str, float]:
    """Fine-tune `model_dir` as a sentence-transformers bi-encoder on MS MARCO (query, positive,
    hard negative) triplets with MultipleNegativesRankingLoss, one epoch, then score NanoBEIR.

    Returns `{"nanobeir_<name>_ndcg10": ..., "nanobeir_mean_ndcg10": ...}`. Needs
    `pip install 'ettin[eval]'` and the Hub. Pooling: "mean", or "lasttoken" for decoders."""
    try:
        from datasets import load_dataset
        from sentence_transformers import (
            SentenceTransformer,
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from sentence_transformers.evaluation import NanoBEIREvaluator
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.models import Pooling as STPooling
        from sentence_transformers.models import Transformer
    except ImportError as err:
        raise ImportError(
            "retrieval on the Hub needs sentence-transformers and datasets: pip install 'ettin[eval]'"
        ) from err
    import tempfile

    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    st = SentenceTransformer(
        modules=[
            Transformer(
                model_dir,
                max_seq_length=max_seq_length,
                model_kwargs={"attn_implementation": "sdpa"},
            ),
            STPooling(hidden, pooling_mode=pooling),
        ]
    )
    train = load_dataset(MSMARCO_TRIPLETS, "triplet", split=f"train[:{train_pairs}]")
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir or tempfile.mkdtemp(prefix="ettin-st-"),
        num_train_epochs=1,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_ratio=0.05,
        save_strategy="no",
        report_to="none",
    )
    SentenceTransformerTrainer(
        model=st, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(st)
    ).train()
    evaluator = NanoBEIREvaluator(dataset_names=list(datasets))
    results = evaluator(st)
    out = {}
    for key, value in results.items():
        if key.endswith("cosine_ndcg@10"):
            # "NanoSciFact_cosine_ndcg@10" -> scifact; "NanoBEIR_mean_cosine_ndcg@10" -> mean
            name = key.removesuffix("_cosine_ndcg@10").removeprefix("Nano").lower()
            name = name.removeprefix("beir_")
            out[f"nanobeir_{name}_ndcg10"] = float(value)
    return out
