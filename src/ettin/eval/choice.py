"""Multiple choice by log-likelihood, for decoders and encoders alike.

A choice's score is the log-probability of its text (the continuation) after the question (the
context), as lm-evaluation-harness computes it:

- decoder: sum over continuation tokens of log p(token | context, earlier continuation tokens),
  from one forward over `[CLS] context continuation`;
- encoder: the pseudo-log-likelihood used for encoders in the Ettin study: each continuation
  token in turn is replaced by [MASK] in `[CLS] context continuation [SEP]` (one row per token)
  and its log-probability read at the mask; the scores are summed.

`acc` picks the highest sum; `acc_norm` divides each sum by the continuation's length in
characters first (lm-evaluation-harness's acc_norm), which stops long choices from losing only
because they have more tokens.

`lm_eval_model` wraps the same scorers as an lm-evaluation-harness `LM`, so that the harness's
real benchmarks (ARC, HellaSwag, PIQA, ...) score encoders and decoders with one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ettin.data.shards import DataError
from ettin.errors import CheckpointError
from ettin.eval.models import ScoringModel, masked_scores, next_token_scores

PAIRS_PER_CALL = 1024


@dataclass(frozen=True)
class ChoiceItem:
    """One question: the context, the candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    label: int


def encode_pair(
    model: ScoringModel, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way the harness does: spaces at the end
    of the context move to the continuation, the whole text is tokenized once, and the
    continuation is what follows the context's own tokens (so BPE merges stay natural)."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = model.tokenize(stripped) if stripped else []
    whole = model.tokenize(stripped + continuation)
    if whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    return context_ids, model.tokenize(continuation)  # a merge across the boundary


def _truncate(context: list[int], continuation: list[int], budget: int) -> list[int]:
    """Drop context tokens from the left so that context + continuation fits `budget`."""
    room = budget - len(continuation)
    if room < 0:
        raise DataError(
            f"a continuation of {len(continuation)} tokens exceeds the model's {budget}: the "
            "task's answers must be shorter than the model's length"
        )
    return context[len(context) - room :] if len(context) > room else context


def continuation_logprobs(
    model: ScoringModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each continuation after its context, both as token ids.

    Decoders: causal log-likelihood. Encoders: pseudo-log-likelihood, one masked row per
    continuation token; is_greedy means every masked token was the encoder's top guess."""
    if len(pairs) > PAIRS_PER_CALL:  # bound the rows held in memory (harness tasks are large)
        return [
            result
            for first in range(0, len(pairs), PAIRS_PER_CALL)
            for result in continuation_logprobs(model, pairs[first : first + PAIRS_PER_CALL])
        ]
    start, end = model.start_ids, model.end_ids
    if model.kind == "decoder":
        rows: list = []
        empty: set[int] = set()
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                empty.add(i)
                continue
            ctx = _truncate(list(ctx), list(cont), model.max_length - len(start))
            if not start and not ctx:
                raise CheckpointError(
                    f"{model.name}: a decoder without a start token ([CLS]/BOS) needs a "
                    "non-empty context to score a continuation"
                )
            ids = [*start, *ctx, *cont]
            rows.append((ids, list(range(len(ids) - len(cont), len(ids)))))
        scores = iter(next_token_scores(model, rows))
        out = []
        for i in range(len(pairs)):
            s = None if i in empty else next(scores)
            out.append((0.0, True) if s is None else (s.total, s.greedy))
        return out
    rows, owner = [], []
    for i, (ctx, cont) in enumerate(pairs):
        ctx = _truncate(list(ctx), list(cont), model.max_length - len(start) - len(end))
        ids = [*start, *ctx, *cont, *end]
        first = len(start) + len(ctx)
        for p in range(first, first + len(cont)):
            rows.append((ids, [p]))
            owner.append(i)
    totals = [0.0] * len(pairs)
    greedy = [True] * len(pairs)
    for i, s in zip(owner, masked_scores(model, rows), strict=True):
        totals[i] += s.total
        greedy[i] = greedy[i] and s.greedy
    return list(zip(totals, greedy, strict=True))


def pick(logprobs: Sequence[float], choices: Sequence[str], normalize: bool = False) -> int:
    """Index of the best choice: highest log-likelihood, or per character when `normalize`
    (ties go to the first)."""
    if normalize:
        values = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    else:
        values = list(logprobs)
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_choice(model: ScoringModel, items: Sequence[ChoiceItem]) -> dict[str, float]:
    """acc and acc_norm (fractions in [0, 1]) over the items."""
    pairs, spans = [], []
    for item in items:
        spans.append((len(pairs), len(item.choices)))
        pairs.extend(encode_pair(model, item.context, c) for c in item.choices)
    scores = [lp for lp, _ in continuation_logprobs(model, pairs)]
    acc = acc_norm = 0
    for item, (first, n) in zip(items, spans, strict=True):
        lps = scores[first : first + n]
        acc += pick(lps, item.choices) == item.label
        acc_norm += pick(lps, item.choices, normalize=True) == item.label
    count = max(len(items), 1)
    return {"acc": acc / count, "acc_norm": acc_norm / count}


# --------------------------------------------------------------------------- lm-evaluation-harness


def text_logprob(model: ScoringModel, text: str) -> float:
    """Log-likelihood of a whole text: causal for decoders (given [CLS]), pseudo for encoders.
    Long texts are scored in windows that each keep as much earlier text as fits."""
    ids = model.tokenize(text)
    if not ids:
        return 0.0
    budget = model.max_length - len(model.start_ids) - len(model.end_ids)
    pairs = []
    for first in range(0, len(ids), budget):
        cont = ids[first : first + budget]
        ctx = ids[max(0, first - (budget - len(cont))) : first]
        pairs.append((ctx, cont))
    return sum(lp for lp, _ in continuation_logprobs(model, pairs))


def lm_eval_model(model: ScoringModel, batch_size: int = 1):
    """An lm-evaluation-harness `LM` over `model` (needs `pip install 'ettin[eval]'`).

    loglikelihood -> `continuation_logprobs`; loglikelihood_rolling -> `text_logprob`. Generation
    tasks are refused: they would need a decoding loop that encoders do not have."""
    try:
        from lm_eval.api.model import LM
    except ImportError as err:
        raise ImportError(
            "lm-eval is not installed: `pip install 'ettin[eval]'` to run the harness's benchmarks"
        ) from err

    class EttinLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.batch_size = batch_size

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [encode_pair(model, *req.args[:2]) for req in requests]
            return continuation_logprobs(model, pairs)

        def loglikelihood_rolling(self, requests) -> list[float]:
            return [text_logprob(model, req.args[0]) for req in requests]

        def generate_until(self, requests) -> list[str]:
            raise NotImplementedError(
                "ettin's harness adapter scores log-likelihood tasks only; pick multiple-choice "
                "or perplexity tasks, or run decoders with `lm_eval --model hf` for generation"
            )

    return EttinLM()


# lm-evaluation-harness tasks scored by log-likelihood (multiple choice / cloze), zero-shot.
DEFAULT_LM_EVAL_TASKS = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "social_iqa",
    "sciq",
    "winogrande",
    "boolq",
    "openbookqa",
    "lambada_openai",
)


def run_lm_eval(
    model: ScoringModel, tasks: Sequence[str], limit: int | None = None, num_fewshot: int = 0
) -> dict[str, float]:
    """Run lm-evaluation-harness tasks (downloaded from the Hub) with our scorers.

    Returns `{"<task>_<metric>": value}` for acc, acc_norm, perplexity and word_perplexity."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm_eval_model(model), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit
    )
    out: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("acc", "acc_norm", "perplexity", "word_perplexity") and filt == "none":
                out[f"{task}_{metric}"] = float(value)
    return out
