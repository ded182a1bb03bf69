"""Data preparation: readers, chunking rules, sampling, the mixture schema and `ettin prep`."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from transformers import AutoTokenizer

from ettin.errors import PrepError
from ettin.prep.chunking import ChunkRules, chunk_document, chunk_spans
from ettin.prep.mixture import load_mixture, parse_mixture
from ettin.prep.pipeline import prep
from ettin.prep.plan import holdout_documents, sample_to_budget, source_targets
from ettin.prep.readers import read_documents

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- readers


def _records(n=3):
    return [{"id": f"d{i}", "text": f"document number {i}", "extra": i} for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_reader_plain_gz_zst(tmp_path, suffix):
    data = "".join(json.dumps(r) + "\n" for r in _records()).encode() + b"\n"  # a blank line too
    path = tmp_path / f"part{suffix}"
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    assert list(read_documents(path, "jsonl")) == [
        (f"d{i}", f"document number {i}") for i in range(3)
    ]


def test_jsonl_folder_order_ids_and_fields(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"body": "first"}) + "\n" + json.dumps({"body": "x"}) + "\n"
    )
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"body": "third"}) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    docs = list(read_documents(tmp_path, "jsonl", text_field="body"))
    assert docs == [
        ("a.jsonl:1", "first"),
        ("a.jsonl:2", "x"),
        ("b.jsonl:1", "second"),
        ("sub/c.jsonl:1", "third"),
    ]


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(PrepError, match=r"x\.jsonl:2: no 'text' field \(found \['content'\]\)"):
        list(read_documents(path, "jsonl"))
    path.write_text("{not json\n")
    with pytest.raises(PrepError, match=r"x\.jsonl:1: not valid JSON"):
        list(read_documents(path, "jsonl"))


def test_parquet_reader(tmp_path):
    pq.write_table(
        pa.table({"text": ["alpha", "beta"], "id": ["p0", None]}), tmp_path / "a.parquet"
    )
    pq.write_table(pa.table({"content": ["gamma"]}), tmp_path / "b.parquet")
    assert list(read_documents(tmp_path / "a.parquet", "parquet")) == [
        ("p0", "alpha"),
        ("a.parquet:1", "beta"),
    ]
    with pytest.raises(PrepError, match=r"b\.parquet: no column 'text' \(columns: \['content'\]\)"):
        list(read_documents(tmp_path, "parquet"))
    assert list(read_documents(tmp_path / "b.parquet", "parquet", text_field="content")) == [
        ("b.parquet:0", "gamma")
    ]


def test_text_reader_sorted_recursive(tmp_path):
    for rel, text in [
        ("z.txt", "last"),
        ("a/b.txt", "nested"),
        ("a.txt", "first"),
        ("skip.md", "no"),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert list(read_documents(tmp_path, "text")) == [
        ("a.txt", "first"),
        ("a/b.txt", "nested"),
        ("z.txt", "last"),
    ]
    assert list(read_documents(tmp_path, "text", glob="*.md")) == [("skip.md", "no")]


class _FakeDataset:
    """The slice of `datasets.Dataset` the hf_disk reader uses."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def select_columns(self, names):
        return _FakeDataset({n: self.columns[n] for n in names})

    def iter(self, batch_size):
        n = len(next(iter(self.columns.values())))
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.columns.items()}


def test_hf_disk_reader(tmp_path, monkeypatch):
    class DatasetDict(dict):
        pass

    saved = DatasetDict(train=_FakeDataset({"text": ["one", "two"], "meta": [1, 2]}))
    fake = types.SimpleNamespace(DatasetDict=DatasetDict, load_from_disk=lambda p: saved)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert list(read_documents(tmp_path, "hf_disk")) == [("0", "one"), ("1", "two")]
    with pytest.raises(PrepError, match=r"no split 'test' \(splits: \['train'\]\)"):
        list(read_documents(tmp_path, "hf_disk", split="test"))


def test_hf_disk_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(PrepError, match="needs the `datasets` package.*pip install datasets"):
        list(read_documents(tmp_path, "hf_disk"))


def test_reader_bad_format_and_path(tmp_path):
    with pytest.raises(
        PrepError, match="unknown format 'csv'; valid formats: jsonl, parquet, text, hf_disk"
    ):
        read_documents(tmp_path, "csv")
    with pytest.raises(PrepError, match="does not exist"):
        read_documents(tmp_path / "missing", "text")


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    ("body", "spans"),
    [
        (0, []),
        (1, [(0, 1)]),  # a short document is kept whole
        (6, [(0, 6)]),  # exactly C tokens with CLS and SEP
        (7, [(0, 6)]),  # the 1-token tail (3 tokens with CLS/SEP) is below min_chunk_tokens=4
        (8, [(0, 6), (6, 8)]),  # the 2-token tail makes a 4-token chunk: kept
        (18, [(0, 6), (6, 12), (12, 18)]),
    ],
)
def test_chunk_spans_split_at_multiples_of_c_minus_2(body, spans):
    assert chunk_spans(body, ChunkRules(context_length=8, min_chunk_tokens=4)) == spans


def test_chunk_document_wraps_every_chunk(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cls, sep = tok.cls_token_id, tok.sep_token_id
    ids = tok("We hold these truths to be self-evident, that all men are created equal. " * 5)[
        "input_ids"
    ]
    rules = ChunkRules(context_length=16, min_chunk_tokens=3)
    chunks = chunk_document(ids, rules, cls, sep)
    assert all(c[0] == cls and c[-1] == sep and len(c) <= 16 for c in chunks)
    assert all(len(c) == 16 for c in chunks[:-1])
    assert (
        np.concatenate([c[1:-1] for c in chunks]).tolist()
        == ids[1:-1][: sum(len(c) - 2 for c in chunks)]
    )
    assert chunks[0].dtype == np.uint32
    with pytest.raises(ValueError, match=r"\[CLS\] \.\.\. \[SEP\]"):
        chunk_document(ids[1:], rules, cls, sep)


def test_backfill_moves_tokens_without_duplicates():
    rules = ChunkRules(context_length=100, min_chunk_tokens=4, backfill_below=40)
    body = 98 * 3 + 10  # the tail is a 12-token chunk
    for seed in range(20):
        spans = chunk_spans(body, rules, np.random.default_rng(seed))
        assert spans[0][0] == 0 and spans[-1][1] == body
        assert all(
            a[1] == b[0] for a, b in zip(spans, spans[1:])
        )  # contiguous: nothing lost or repeated
        lengths = [e - s + 2 for s, e in spans]
        assert all(40 <= n <= 100 for n in lengths[-2:]) and lengths[:2] == [100, 100]
    assert chunk_spans(body, rules, np.random.default_rng(1)) == chunk_spans(
        body, rules, np.random.default_rng(1)
    )
    with pytest.raises(ValueError, match="rng"):
        chunk_spans(body, rules)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_length": 2}, "at least 3"),
        ({"context_length": 8, "min_chunk_tokens": 9}, "min_chunk_tokens"),
        ({"context_length": 8, "min_chunk_tokens": 2, "backfill_below": 5}, "backfill_below"),
    ],
)
def test_chunk_rules_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChunkRules(**kwargs)


# --------------------------------------------------------------------------- sampling and split


def test_sample_to_budget():
    lengths = np.array([10, 20, 30, 40])
    idx, copy = sample_to_budget(lengths, None, np.random.default_rng(0))
    assert idx.tolist() == [0, 1, 2, 3] and copy.tolist() == [0, 0, 0, 0]
    idx, copy = sample_to_budget(lengths, 250, np.random.default_rng(0))  # 2 full copies + >= 50
    assert np.bincount(idx, minlength=4).min() >= 2 and copy.max() == 2
    assert 250 <= lengths[idx].sum() < 250 + 40
    idx, _ = sample_to_budget(lengths, 35, np.random.default_rng(0))
    assert len(set(idx.tolist())) == len(idx) and 35 <= lengths[idx].sum() < 75
    idx, copy = sample_to_budget(lengths, 1000, np.random.default_rng(0), repeat=False)
    assert sorted(idx.tolist()) == [0, 1, 2, 3] and copy.max() == 0


def test_holdout_documents():
    tokens = np.array([100] * 10)
    mask = holdout_documents(tokens, 0.2, np.random.default_rng(3))
    assert mask.sum() == 2 and np.array_equal(
        mask, holdout_documents(tokens, 0.2, np.random.default_rng(3))
    )
    assert holdout_documents(tokens, 0.001, np.random.default_rng(3)).sum() == 1  # at least one
    assert (
        holdout_documents(np.array([5, 5]), 0.49, np.random.default_rng(0)).sum() == 1
    )  # never all
    assert holdout_documents(np.array([5]), 0.2, np.random.default_rng(0)).sum() == 0


def _mixture(phases: dict, sources: dict | None = None, **top) -> dict:
    return {"sources": sources or {"a": {"path": "x", "format": "text"}}, "phases": phases, **top}


def test_source_targets_weights_fixed_natural():
    def targets(mix, tokens=1000):
        m = parse_mixture(
            _mixture(
                {"p": {"context_length": 64, "tokens": tokens, "mix": mix}},
                {n: {"path": "x", "format": "text"} for n in mix},
            )
        )
        return source_targets(m.phases["p"], {"a": 300, "b": 100, "c": 600})

    assert targets({"a": {"weight": 3}, "b": {"weight": 1}}) == {"a": 750, "b": 250}
    assert targets({"a": {"tokens": 200}, "b": {"weight": 1}, "c": {"weight": 1}}) == {
        "a": 200,
        "b": 400,
        "c": 400,
    }
    assert targets({"a": {}, "c": {}, "b": {"tokens": 100}}) == {"a": 300, "c": 600, "b": 100}
    assert targets({"a": {}}, tokens=None) == {"a": None}


# --------------------------------------------------------------------------- mixture errors


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            _mixture({"p": {"context_lenght": 8, "mix": {"a": {}}}}),
            r"m\.yaml: unknown config key 'phases\.p\.context_lenght'; "
            r"did you mean 'phases\.p\.context_length'\?",
        ),
        (
            _mixture({"p": {"context_length": 64, "mix": {"a": {}}}}, tokenizr="x"),
            r"did you mean 'tokenizer'\?",
        ),
        (
            _mixture({"p": {"context_length": 64, "mix": {"a": {"wieght": 1}}}}),
            r"'phases\.p\.mix\.a\.wieght'; did you mean 'phases\.p\.mix\.a\.weight'\? "
            r"Valid keys under 'phases\.p\.mix\.a': weight, tokens",
        ),
        (_mixture({"p": {"context_length": 64, "mix": {"b": {}}}}), r"unknown source\(s\) \['b'\]"),
        (
            _mixture(
                {"p": {"context_length": 64, "mix": {"a": {}}}},
                {"a": {"path": "x", "format": "csv"}},
            ),
            r"sources\.a: format 'csv' is not one of jsonl, parquet, text, hf_disk",
        ),
        (
            _mixture({"p": {"context_length": 64, "mix": {"a": {"weight": 1}}}}),
            r"phases\.p: .*have a weight but",
        ),
        (_mixture({"p": {"mix": {"a": {}}}}), r"required key not set: 'phases\.p\.context_length'"),
        (
            _mixture({"p": {"context_length": "long", "mix": {"a": {}}}}),
            r"bad value at 'phases\.p\.context_length'",
        ),
        (
            _mixture({"p": {"context_length": 64, "val_fraction": 0.7, "mix": {"a": {}}}}),
            r"phases\.p: val_fraction",
        ),
    ],
)
def test_mixture_errors_name_the_file_and_key(tmp_path, raw, message):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PrepError, match=message):
        load_mixture(path)


@pytest.mark.parametrize("name", ["sotu", "ettin-phase1", "ettin-phase2", "ettin-phase3", "bench"])
def test_bundled_mixtures_are_valid(name):
    mix = load_mixture(REPO / "data_prep" / f"{name}.yaml")
    assert mix.phases and all(p.context_length in (128, 1024, 8000) for p in mix.phases.values())


def test_sotu_mixture_phases():
    phases = load_mixture(REPO / "data_prep" / "sotu.yaml").phases
    assert {n: p.context_length for n, p in phases.items() if n != "demo"} == {
        "pretrain": 1024,
        "extension": 8000,
        "decay": 8000,
    }
    assert all(p.val_fraction > 0 for p in phases.values())


# --------------------------------------------------------------------------- prep end to end


@pytest.fixture(scope="module")
def speeches(sotu_dir, tmp_path_factory) -> Path:
    """Five speeches (public domain) in a folder of their own."""
    out = tmp_path_factory.mktemp("sotu5")
    for path in sorted(sotu_dir.glob("*.txt"))[:5]:
        shutil.copy(path, out / path.name)
    return out


def _write_mixture(path: Path, speeches: Path, tokenizer_dir: Path, seed: int = 7) -> Path:
    raw = {
        "tokenizer": str(tokenizer_dir),
        "sources": {
            "speeches": {"path": str(speeches), "format": "text"},
            "notes": {"path": str(speeches), "format": "text", "max_docs": 2},
        },
        "phases": {
            "short": {
                "context_length": 256,
                "tokens": 30_000,
                "val_fraction": 0.2,
                "seed": seed,
                "mix": {"speeches": {"weight": 3}, "notes": {"weight": 1}},
            },
            "long": {
                "context_length": 1024,
                "val_fraction": 0.2,
                "seed": seed + 1,
                "min_chunk_tokens": 64,
                "backfill_below": 512,
                "mix": {"speeches": {}},
            },
        },
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(speeches, tokenizer_dir, tmp_path_factory):
    """The small mixture prepared twice: in-process, then with two worker processes via the CLI."""
    from ettin.cli import main

    root = tmp_path_factory.mktemp("prep")
    mixture = _write_mixture(root / "mix.yaml", speeches, tokenizer_dir)
    result = prep(mixture, root / "one", workers=1, verbose=False)
    main(["prep", str(mixture), "--out", str(root / "two"), "--num-proc", "2", "--quiet"])
    return root, result


def test_prep_is_byte_identical_across_runs_and_num_proc(prepared):
    root, _ = prepared
    one, two = _tree(root / "one"), _tree(root / "two")
    assert one == two
    assert {
        "short/train/index.json",
        "short/val/index.json",
        "short/stats.json",
        "long/meta.json",
    } <= set(one)
    assert not any(name.startswith(".") for name in one)  # no temp folders left


def _read_split(path: Path) -> list[dict]:
    from streaming import LocalDataset

    ds = LocalDataset(str(path))
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("phase", ["short", "long"])
def test_stats_match_shard_contents(prepared, tokenizer_dir, phase):
    root, result = prepared
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stats = json.loads((root / "one" / phase / "stats.json").read_text())
    meta = json.loads((root / "one" / phase / "meta.json").read_text())
    assert stats == result.stats[phase]
    c = meta["context_length"]
    assert meta["tokenizer"]["cls_token_id"] == tok.cls_token_id and meta["tokenizer"][
        "vocab_size"
    ] == len(tok)
    docs_by_split = {}
    for split, expected in stats["splits"].items():
        path = root / "one" / phase / split
        samples = _read_split(path) if expected["chunks"] else []
        assert len(samples) == expected["chunks"]
        assert sum(len(s["input_ids"]) for s in samples) == expected["tokens"]
        for source, counts in expected["sources"].items():
            mine = [s for s in samples if s["source"] == source]
            assert len(mine) == counts["chunks"]
            assert sum(len(s["input_ids"]) for s in mine) == counts["tokens"]
            assert len({s["id"].split("#")[0] for s in mine}) == counts["documents"]
        for s in samples:
            ids = s["input_ids"]
            assert (
                ids.dtype == np.uint32
                and ids[0] == tok.cls_token_id
                and ids[-1] == tok.sep_token_id
            )
            assert len(ids) <= c and tok.pad_token_id not in ids
        docs_by_split[split] = {(s["source"], s["id"].split("#")[0]) for s in samples}
    assert not docs_by_split["train"] & docs_by_split["val"]  # held-out documents never train
    assert (
        max(max(s["input_ids"]) for s in _read_split(root / "one" / phase / "train"))
        == meta["max_token_id"]
    )


def test_prep_budget_and_upsampling(prepared):
    _, result = prepared
    short = result.stats["short"]
    assert 30_000 <= short["splits"]["train"]["tokens"] < 30_000 + 2 * 256
    notes = short["sources"]["notes"]
    assert notes["documents_read"] == 2 and notes["documents_val"] == 1
    # the 2-speech source is shorter than its 7,500-token share: its chunks are repeated
    assert notes["train_tokens_available"] < notes["train_tokens_target"] == 7_500
    assert short["splits"]["train"]["sources"]["notes"]["tokens"] >= 7_500
    long = result.stats["long"]
    assert long["sources"]["speeches"]["chunks_backfilled"] > 0
    available = long["sources"]["speeches"]["train_tokens_available"]
    assert long["splits"]["train"]["tokens"] == available  # no budget: every train chunk once


def test_phases_hold_out_the_same_documents(prepared):
    root, _ = prepared
    held = [
        {
            s["id"].split("#")[0]
            for s in _read_split(root / "one" / p / "val")
            if s["source"] == "speeches"
        }
        for p in ("short", "long")
    ]
    assert held[0] == held[1] and len(held[0]) == 1


def test_interrupted_prep_leaves_previous_output_and_resumes(
    prepared, speeches, tokenizer_dir, monkeypatch
):
    from streaming import MDSWriter

    root, _ = prepared
    out = root / "interrupted"
    shutil.copytree(root / "one", out)
    before = _tree(out)
    mixture = _write_mixture(root / "mix-reseeded.yaml", speeches, tokenizer_dir, seed=99)
    real_write, calls = MDSWriter.write, []

    def failing_write(self, sample):
        calls.append(1)
        if "long" in str(self.local) and len(calls) > 3:
            raise RuntimeError("disk full")
        return real_write(self, sample)

    monkeypatch.setattr(MDSWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prep(mixture, out, verbose=False)
    after = _tree(out)
    # 'short' finished and was swapped in (new seed, new content); 'long' failed and is untouched
    assert {k: v for k, v in after.items() if k.startswith("long/")} == {
        k: v for k, v in before.items() if k.startswith("long/")
    }
    assert after["short/stats.json"] != before["short/stats.json"]
    # the work folder stays for a resume; nothing half-written is marked done
    work = out / ".prep-work"
    assert sorted(p.name for p in out.iterdir()) == [".prep-work", "long", "short"]
    assert (work / "done" / "short.json").is_file() and not (work / "done" / "long.json").exists()
    assert not list((work / "shards" / "long").rglob("shard.*.json"))
    monkeypatch.setattr(MDSWriter, "write", real_write)
    from ettin.prep.encode import BodyEncoder

    encoded = []
    real_call = BodyEncoder.__call__
    monkeypatch.setattr(
        BodyEncoder, "__call__", lambda self, t: encoded.append(1) or real_call(self, t)
    )
    prep(mixture, out, verbose=False)  # the same command resumes: nothing is tokenized again
    assert not encoded
    assert sorted(p.name for p in out.iterdir()) == ["long", "short"]
    assert _tree(out)["short/stats.json"] == after["short/stats.json"]
    fresh = root / "fresh"
    prep(mixture, fresh, verbose=False)
    assert _tree(out) == _tree(fresh)  # resumed == from scratch, byte for byte
    assert encoded  # (the fresh run did encode: the counter counts)


def test_prep_bad_inputs(tmp_path, speeches, tokenizer_dir):
    mixture = yaml.safe_load(
        _write_mixture(tmp_path / "m.yaml", speeches, tokenizer_dir).read_text()
    )

    def run(raw, **kwargs):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        return prep(path, tmp_path / "out", verbose=False, **kwargs)

    missing = json.loads(json.dumps(mixture))
    missing["sources"]["notes"]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(PrepError, match=r"source 'notes': path .*nowhere does not exist"):
        run(missing)
    (tmp_path / "empty").mkdir()
    empty = json.loads(json.dumps(mixture))
    empty["sources"]["notes"]["path"] = str(tmp_path / "empty")
    with pytest.raises(
        PrepError, match=r"source 'notes' \(.*empty, format text\) has no documents"
    ):
        run(empty)
    with pytest.raises(PrepError, match=r"bad\.yaml: no phase 'shrt' \(did you mean 'short'\?\)"):
        run(mixture, phases=["shrt"])

    from helpers import word_tokenizer

    nocls = word_tokenizer(["a"], ["[UNK]"], specials_first=True, template=False)
    nocls.save_pretrained(tmp_path / "nocls")
    with pytest.raises(PrepError, match=r"tokenizer '.*nocls': the tokenizer has no CLS token"):
        run(mixture, tokenizer=str(tmp_path / "nocls"))
    assert not (tmp_path / "out" / "short").exists()


def test_star_import_gives_every_public_name():
    import subprocess

    code = "from ettin.prep import *; import ettin.prep as p; print(len([getattr(p, n) for n in p.__all__]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import ettin.prep

    assert int(done.stdout) == len(ettin.prep.__all__) >= 20
