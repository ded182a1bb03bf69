"""Evaluation: every scorer on hand-made cases with known answers, then the suite end to end.

Scorers are checked with a bigram stub: its logits at a position come from a table row chosen
by one context token (a decoder: the token itself, predicting the next; an encoder: the left
neighbour of a [MASK], and no information at unmasked positions). So the right answers, and
the exact log-probabilities, are known by construction.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import word_tokenizer
from transformers import (
    ModernBertConfig,
    ModernBertDecoderConfig,
    ModernBertDecoderForCausalLM,
    ModernBertForMaskedLM,
)

from ettin.eval.bias import PRONOUNS, TEMPLATES, build_bias_items, evaluate_bias, preferred_pronouns
from ettin.eval.choice import (
    ChoiceItem,
    continuation_logprobs,
    encode_pair,
    evaluate_choice,
    lm_eval_model,
    pick,
)
from ettin.eval.classify import (
    ClassificationData,
    classification_metrics,
    evaluate_classification,
    pool,
)
from ettin.eval.intrinsic import clm_scores, mlm_scores, perplexity
from ettin.eval.models import EvalModel, length_batches, model_kind
from ettin.eval.retrieval import RetrievalData, ndcg_at_k, rank_passages, score_retrieval
from ettin.eval.suite import METRIC_COLUMNS, model_origin, parse_tasks, run_suite
from ettin.eval.tasks import (
    QUICK,
    build_offline_tasks,
    era_of,
    paragraphs,
    read_speeches,
    split_speeches,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP spin-waits between processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
PAD, CLS, SEP, MASK, UNK = range(5)


class BigramStub:
    """A `ScoringModel` whose logits are `table[context token]` (see the module docstring)."""

    def __init__(self, kind, words, pairs=None, columns=None):
        self.name, self.kind = f"stub-{kind}", kind
        self.vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
        self.table = torch.zeros(len(self.vocab), len(self.vocab))
        for (a, b), bonus in (pairs or {}).items():
            self.table[self.vocab[a], self.vocab[b]] += bonus
        for b, bonus in (columns or {}).items():
            self.table[:, self.vocab[b]] += bonus
        self.pad_id, self.mask_id, self.start_ids, self.end_ids, self.max_length = (
            PAD,
            MASK,
            [CLS],
            [SEP],
            512,
        )

    def tokenize(self, text):
        return [self.vocab.get(w, UNK) for w in text.lower().replace(".", " .").split()]

    def hidden(self, input_ids, attention_mask):
        if self.kind == "decoder":
            context = input_ids
        else:
            left = torch.cat([torch.full_like(input_ids[:, :1], PAD), input_ids[:, :-1]], dim=1)
            context = torch.where(input_ids == MASK, left, torch.full_like(input_ids, PAD))
        return F.one_hot(context, len(self.vocab)).float()

    def project(self, hidden):
        return hidden @ self.table


def logp(stub, a, b):
    """The stub's exact log p(b | context a)."""
    return float(F.log_softmax(stub.table[stub.vocab[a]], -1)[stub.vocab[b]])


# --------------------------------------------------------------------------- multiple choice

WORDS = list("abcdefgh")
ITEMS = [
    ChoiceItem("a b", (" c d", " e f", " g h"), 0),
    ChoiceItem("a b", (" e f", " g h", " c d"), 2),
    ChoiceItem("a b", (" g h", " c d", " e f"), 1),
]


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_choice_scores_follow_the_logits(kind):
    right = BigramStub(kind, WORDS, {("b", "c"): 5.0, ("c", "d"): 5.0})
    assert evaluate_choice(right, ITEMS) == {"acc": 1.0, "acc_norm": 1.0}
    wrong = BigramStub(kind, WORDS, {("b", "e"): 5.0, ("e", "f"): 5.0})
    assert evaluate_choice(wrong, ITEMS) == {"acc": 0.0, "acc_norm": 0.0}


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_continuation_logprob_is_the_sum_over_tokens(kind):
    stub = BigramStub(kind, WORDS, {("b", "c"): 2.0, ("c", "d"): 3.0})
    [(total, greedy)] = continuation_logprobs(stub, [encode_pair(stub, "a b", " c d")])
    assert total == pytest.approx(logp(stub, "b", "c") + logp(stub, "c", "d"), abs=1e-5)
    assert greedy
    [(_, greedy)] = continuation_logprobs(stub, [encode_pair(stub, "a b", " e f")])
    assert not greedy


def test_length_normalisation_changes_the_pick():
    assert pick([-2.0, -3.0], [" b", " c d e"]) == 0
    assert pick([-2.0, -3.0], [" b", " c d e"], normalize=True) == 1
    # The same through a model: " b" is likelier than " c d e" in total, less per character.
    stub = BigramStub(
        "decoder", WORDS, {("a", "b"): 3.0, ("a", "c"): 2.5, ("c", "d"): 8.0, ("d", "e"): 8.0}
    )
    item = ChoiceItem("a", (" b", " c d e"), 1)
    short = logp(stub, "a", "b")
    long = logp(stub, "a", "c") + logp(stub, "c", "d") + logp(stub, "d", "e")
    assert short > long and short / 2 < long / 6  # the crafted case really is one
    assert evaluate_choice(stub, [item]) == {"acc": 0.0, "acc_norm": 1.0}


def test_encode_pair_moves_the_space_and_splits_once():
    stub = BigramStub("decoder", WORDS)
    assert encode_pair(stub, "a b ", "c") == ([5, 6], [7])


# --------------------------------------------------------------------------- intrinsic


CYCLE = [f"w{i}" for i in range(10)]


def cycle_stub(kind):
    return BigramStub(kind, CYCLE, {(CYCLE[i], CYCLE[(i + 1) % 10]): 4.0 for i in range(10)})


def test_intrinsic_cross_scoring_on_a_stub():
    chunk = [5 + i % 10 for i in range(12)]  # w0 w1 ... w9 w0 w1
    dec, enc = cycle_stub("decoder"), cycle_stub("encoder")
    ce = -logp(dec, "w0", "w1")  # every in-cycle prediction has this probability
    mlm_pos, clm_pos = [[2, 5, 8]], [[1, 4, 11]]
    for scores in (
        mlm_scores(dec, [chunk], mlm_pos),  # decoder on MLM positions, by next-token prediction
        mlm_scores(enc, [chunk], mlm_pos),  # encoder, all masked at once
        clm_scores(dec, [chunk], clm_pos),
        clm_scores(enc, [chunk], clm_pos),  # encoder on next-token, by masking the last position
    ):
        assert scores["acc"] == 1.0
        assert scores["ce"] == pytest.approx(ce, abs=1e-5)
    # Adjacent masks: position 3's left neighbour is itself masked, so the encoder has no clue.
    assert mlm_scores(enc, [chunk], [[2, 3]])["acc"] == 0.5
    # Perplexity covers every token, the first one predicted from [CLS] (uniform): log V nats.
    expected = math.exp((math.log(len(dec.vocab)) + 11 * ce) / 12)
    assert perplexity(dec, [chunk]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(enc, [chunk])


# --------------------------------------------------------------------------- retrieval


def test_ndcg_at_10_hand_computed():
    relevance = {"d2": 2.0, "d4": 1.0, "d5": 3.0}
    # DCG = 2/log2(3) + 1/log2(5); ideal = 3/log2(2) + 2/log2(3) + 1/log2(4)
    expected = (2 / math.log2(3) + 1 / math.log2(5)) / (3 + 2 / math.log2(3) + 0.5)
    assert ndcg_at_k(["d1", "d2", "d3", "d4"], relevance) == pytest.approx(expected)
    assert expected == pytest.approx(0.355436, abs=1e-6)
    assert ndcg_at_k(["d5", "d2", "d4"], relevance) == pytest.approx(1.0)
    assert ndcg_at_k([f"x{i}" for i in range(10)] + ["d5"], relevance) == 0.0  # rank 11 is cut off
    assert ndcg_at_k(["p3", "p1"], {"p1": 1.0}) == pytest.approx(1 / math.log2(3))


def test_retrieval_ranks_by_cosine():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    passages = torch.tensor([[0.0, 2.0], [3.0, 0.1], [1.0, 0.9]])
    assert rank_passages(queries, passages, k=2).tolist() == [[1, 2], [0, 2], [2, 1]]
    # A bag-of-words stub (mean-pooled one-hot vectors) finds each query's own passage.
    stub = BigramStub("decoder", WORDS)
    data = RetrievalData(
        [],
        {"q0": "a b", "q1": "c d", "q2": "e f"},
        {"p0": "f e", "p1": "b a", "p2": "d c"},
        {"q0": {"p1": 1.0}, "q1": {"p2": 1.0}, "q2": {"p0": 1.0}},
    )
    assert score_retrieval(stub, data) == pytest.approx(1.0)


def test_classification_probe_and_metrics():
    stub = BigramStub("decoder", WORDS)
    texts = ["a c", "a d", "b c", "b d", "a e", "b e"]
    data = ClassificationData(texts, [0, 0, 1, 1, 0, 1], ["a f", "b f"], [0, 1], ["A", "B"])
    assert evaluate_classification(stub, data, mode="probe", pooling="mean") == {
        "acc": 1.0,
        "f1": 1.0,
    }
    # acc 3/4; class 0: tp 1, fp 0, fn 1 -> F1 2/3; class 1: tp 2, fp 1, fn 0 -> F1 4/5.
    metrics = classification_metrics(torch.tensor([0, 1, 1, 1]), [0, 0, 1, 1], 2)
    assert metrics["acc"] == 0.75 and metrics["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_pooling():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0], [7.0, 8.0]]
    assert pool(hidden, mask, "cls").tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert pool(hidden, mask, "last").tolist() == [[4.0, 5.0], [8.0, 9.0]]


def test_length_batches_respects_the_token_budget():
    batches = length_batches([5, 30, 10, 30, 2], max_tokens=60)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert all(len(b) * max([5, 30, 10, 30, 2][i] for i in b) <= 60 for b in batches)


# --------------------------------------------------------------------------- bias


BIAS_WORDS = sorted({w for forms in PRONOUNS.values() for w in forms.values()})


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("lean", ["she", "he"])
def test_bias_probe_finds_the_preferred_pronoun(kind, lean):
    items = build_bias_items(["nurse", "engineer"])
    assert len(items) == 2 * len(TEMPLATES) == 40
    favoured = {PRONOUNS[case][lean] for case in PRONOUNS}  # e.g. she / her
    stub = BigramStub(kind, BIAS_WORDS, columns={w: 3.0 for w in favoured})
    assert preferred_pronouns(stub, items) == [lean] * len(items)
    result = evaluate_bias(stub, items)
    assert result[lean] == 1.0 and result["they"] == 0.0
    assert result["gap"] == (1.0 if lean == "he" else -1.0)


def test_bias_templates_fill_every_case():
    for item in build_bias_items(["pilot"]):
        sentences = {g: item.sentence(g) for g in ("he", "she", "they")}
        assert len(set(sentences.values())) == 3
        assert "{" not in sentences["he"] and "pilot" in sentences["he"]


# --------------------------------------------------------------------------- offline tasks

NOUNS = (
    "nation people congress army treasury law trade peace war state union citizen court tax".split()
)
VERBS = "protects requires supports builds restores honors expands reviews".split()
ADJS = "great free strong public new national common fair".split()


def fake_speech(seed: int) -> str:
    """12 paragraphs of 4 nine-word sentences, fixed by `seed` (no randomness)."""
    paras = []
    for p in range(12):
        sents = []
        for s in range(4):
            i = seed * 31 + p * 7 + s * 3
            sents.append(
                f"The {ADJS[i % 8]} {NOUNS[i % 14]} {VERBS[(i // 3) % 8]} the "
                f"{NOUNS[(i + 5) % 14]} of our {NOUNS[(i * 7 + 2) % 14]}."
            )
        paras.append(" ".join(sents))
    return "\n\n".join(paras) + "\n"


SPEECHES = ["1801-Jefferson", "1805-Jefferson", "1810-Madison-1", "1815-Madison", "1901-Roosevelt"]
SPEECHES += ["1905-Roosevelt", "1910-Taft", "1915-Wilson-2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sotu")
    for n, name in enumerate(SPEECHES):
        (root / f"{name}.txt").write_text(fake_speech(n))
    (root / "README.md").write_text("not a speech")
    return root


def test_offline_tasks_are_deterministic_and_disjoint(corpus):
    speeches = read_speeches(corpus)
    assert [s.year for s in speeches] == [1801, 1805, 1810, 1815, 1901, 1905, 1910, 1915]
    assert speeches[2].president == "Madison"
    train, test = split_speeches(speeches)
    assert [s.path.stem for s in test] == ["1815-Madison", "1915-Wilson-2"]
    assert not {s.path for s in train} & {s.path for s in test}
    assert era_of(1815) == "1790-1849" and era_of(1915) == "1900-1949"
    assert all(len(p.split()) >= 20 for p in paragraphs(fake_speech(0)))

    a, b = build_offline_tasks(corpus, QUICK), build_offline_tasks(corpus, QUICK)
    assert a.choice == b.choice and a.classify == b.classify and a.retrieval == b.retrieval
    for item in a.choice:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
    assert a.classify.label_names == ["1790-1849", "1900-1949"]
    assert set(a.classify.test_labels) == {0, 1}
    train_text = " ".join(" ".join(s.text for s in train).split())
    assert all(t in train_text for t in a.classify.train_texts)
    for qid, rel in a.retrieval.qrels.items():
        [(pid, gain)] = rel.items()
        assert gain == 1.0 and pid in a.retrieval.passages and qid in a.retrieval.queries


# --------------------------------------------------------------------------- real HF models


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny random encoder and decoder exported as HF directories, with a word tokenizer."""
    template_words = (
        " ".join(t for t, _, _ in TEMPLATES).replace(",", " ").replace(".", " ").split()
    )
    words = [*NOUNS, *VERBS, *ADJS, *BIAS_WORDS, *template_words, "the", "of", "our", "."]
    tokenizer = word_tokenizer(
        sorted({w.lower() for w in words if "{" not in w}),
        SPECIALS,
        specials_first=True,
        lowercase=True,
        pair=True,
    )
    common = dict(
        vocab_size=len(tokenizer) + 3,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        local_attention=16,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=CLS,
        cls_token_id=CLS,
        eos_token_id=SEP,
        sep_token_id=SEP,
    )
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ModernBertForMaskedLM(ModernBertConfig(**common)).save_pretrained(root / "enc-tiny")
    # The export records the lineage: this decoder continued an encoder (ettin_objectives).
    ModernBertDecoderForCausalLM(
        ModernBertDecoderConfig(**common, ettin_objectives=["mlm", "clm"])
    ).save_pretrained(root / "dec-tiny-from-enc")
    for name in ("enc-tiny", "dec-tiny-from-enc"):
        tokenizer.save_pretrained(root / name)
    return root / "enc-tiny", root / "dec-tiny-from-enc"


def test_load_detects_the_kind(hf_models, tmp_path):
    enc_dir, dec_dir = hf_models
    assert model_kind(enc_dir) == "encoder" and model_kind(dec_dir) == "decoder"
    dec = EvalModel.load(dec_dir)
    assert EvalModel.load(enc_dir).lineage == ["mlm"] and dec.lineage == ["mlm", "clm"]
    assert model_origin(["mlm"]) == "native" and model_origin(dec.lineage) == "cross"
    assert dec.kind == "decoder" and dec.start_ids == [CLS] and dec.mask_id == MASK
    # The split scoring path equals the HF forward's logits.
    ids = torch.tensor([[CLS, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = dec.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
        split = dec.project(dec.hidden(ids, mask))
    torch.testing.assert_close(split, full)
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither"):
        model_kind(bad)


def test_suite_end_to_end(hf_models, corpus, tmp_path):
    enc_dir, dec_dir = hf_models
    rows = run_suite([enc_dir, dec_dir], corpus, tmp_path / "out", quick=True, log=lambda _: None)
    assert [(r["model"], r["kind"], r["origin"]) for r in rows] == [
        ("enc-tiny", "encoder", "native"),
        ("dec-tiny-from-enc", "decoder", "cross"),
    ]
    metrics = [c for cols in METRIC_COLUMNS.values() for c in cols]
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["model", "kind", "origin", "params", *metrics, "seconds"]
    by_kind = {r["kind"]: r for r in table}
    assert by_kind["encoder"]["ppl"] == "" and float(by_kind["decoder"]["ppl"]) > 1
    for name in metrics:
        if name != "ppl":
            assert all(r[name] != "" for r in table), name
    for row in rows:
        for name in ("mlm_acc", "clm_acc", "choice_acc", "era_acc", "retrieval_ndcg10", "bias_she"):
            assert 0.0 <= row[name] <= 1.0
        assert row["bias_he"] + row["bias_she"] + row["bias_they"] == pytest.approx(1.0)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| model | kind | origin | params | mlm_acc" in md and "dec-tiny-from-enc" in md
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_the_bias_task(hf_models, tmp_path, capsys):
    from ettin.cli import main

    enc_dir, dec_dir = hf_models
    main(
        [
            "eval",
            "--models",
            str(enc_dir),
            str(dec_dir),
            "--tasks",
            "bias",
            "--out",
            str(tmp_path),
            "--quick",
            "--threads",
            "1",
        ]
    )
    assert "results.md" in capsys.readouterr().out
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == "model,kind,origin,params,bias_he,bias_she,bias_they,bias_gap,seconds"


def test_task_names_are_checked():
    assert parse_tasks("intrinsic, bias") == ["intrinsic", "bias"]
    assert parse_tasks(None) == ["intrinsic", "choice", "classify", "retrieval", "bias"]
    assert parse_tasks("lm-eval:arc_easy+piqa,glue:sst2,nanobeir") == [
        "lm-eval:arc_easy+piqa",
        "glue:sst2",
        "nanobeir",
    ]
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("intrinsics")
    with pytest.raises(ValueError, match="name the glue task's name"):
        parse_tasks("glue")
    with pytest.raises(ValueError, match="unknown task 'bias:x'"):
        parse_tasks("bias:x")  # offline tasks take no argument


# --------------------------------------------------------------------------- optional libraries, faked


def test_lm_eval_adapter_scores_requests(monkeypatch):
    """The harness adapter, with a stand-in for `lm_eval.api.model.LM` (lm-eval is optional)."""

    class LM:
        def __init__(self):
            self._rank = 0

    fake = types.ModuleType("lm_eval.api.model")
    fake.LM = LM
    for name in ("lm_eval", "lm_eval.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", fake)
    stub = BigramStub("decoder", WORDS, {("b", "c"): 5.0, ("c", "d"): 5.0})
    lm = lm_eval_model(stub)
    request = types.SimpleNamespace
    out = lm.loglikelihood([request(args=("a b", " c d")), request(args=("a b", " e f"))])
    assert out[0][1] and not out[1][1] and out[0][0] > out[1][0]
    [rolling] = lm.loglikelihood_rolling([request(args=("a b c d",))])
    assert rolling == pytest.approx(
        logp(stub, "[CLS]", "a") + logp(stub, "a", "b") + out[0][0], abs=1e-5
    )
    with pytest.raises(NotImplementedError):
        lm.generate_until([request(args=("a", {}))])


def test_glue_loader_maps_fields(monkeypatch):
    """`glue_task` with a stand-in for `datasets.load_dataset` (datasets is optional)."""
    from ettin.eval.tasks import glue_task

    class FakeSplit(list):
        features = {"label": types.SimpleNamespace(names=["entailment", "not_entailment"])}

        def select(self, indices):
            return FakeSplit(self[i] for i in indices)

    def load_dataset(path, name, split):
        assert (path, name) == ("nyu-mll/glue", "rte")
        return FakeSplit(
            {"sentence1": f"{split} a{i}", "sentence2": f"b{i}", "label": i % 2} for i in range(5)
        )

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = glue_task("rte", max_train=3)
    assert data.train_texts == [("train a0", "b0"), ("train a1", "b1"), ("train a2", "b2")]
    assert data.test_labels == [0, 1, 0, 1, 0] and data.label_names == [
        "entailment",
        "not_entailment",
    ]
