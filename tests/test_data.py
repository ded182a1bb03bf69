"""Dataset checks, sample rules, collation/packing and the DataSpec (ettin.data)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import random_samples, tiny_tokenizer, write_phase, write_split

from ettin.config import DataConfig, ObjectiveConfig
from ettin.data import (
    Collator,
    DataError,
    SampleRules,
    TokenDataset,
    build_dataloader,
    pack,
    packing_efficiency,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def phase(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("phase")
    return write_phase(
        root,
        tok,
        {
            "train": random_samples(120, tok, seed=1),
            "val": random_samples(21, tok, seed=2, max_len=20),
        },
    )


def _rules(tok, encoder=True, max_seq_len=8):
    return SampleRules.from_tokenizer(tok, max_seq_len=max_seq_len, encoder=encoder)


# --------------------------------------------------------------------------- sample rules


def test_rules_prepend_bos_and_append_eos_for_encoders(tok):
    cls, sep = tok.cls_token_id, tok.sep_token_id
    enc, dec = _rules(tok, True), _rules(tok, False)
    assert enc.apply(np.array([5, 6], np.uint32)).tolist() == [cls, 5, 6, sep]
    assert dec.apply(np.array([5, 6], np.uint32)).tolist() == [cls, 5, 6]
    assert dec.apply(np.array([cls, 5, sep], np.uint32)).tolist() == [cls, 5, sep]
    assert enc.apply(np.array([cls, 5, sep], np.uint32)).tolist() == [cls, 5, sep]


def test_rules_truncate(tok):
    cls, sep = tok.cls_token_id, tok.sep_token_id
    long = np.array([cls, *range(10), sep], np.uint32)  # 12 tokens, max 8
    assert _rules(tok, True).apply(long).tolist() == [cls, 0, 1, 2, 3, 4, 5, sep]
    assert _rules(tok, False).apply(long).tolist() == [cls, 0, 1, 2, 3, 4, 5, 6]
    exact = np.array([cls, *range(6), sep], np.uint32)  # 8 tokens: untouched
    assert _rules(tok, True).apply(exact).tolist() == exact.tolist()


def test_pad_and_out_of_vocab_samples_are_errors_naming_the_sample(tmp_path, tok):
    bad = [np.array([tok.cls_token_id, 3, tok.pad_token_id, tok.sep_token_id], np.uint32)]
    write_phase(tmp_path, tok, {"train": random_samples(3, tok) + bad})
    ds = TokenDataset(tmp_path, "train", _rules(tok, max_seq_len=16), tokenizer=tok)
    with pytest.raises(DataError, match=r"sample 3 \(row 3 of shard .*shard\.00000\.mds\).*PAD"):
        ds[3]
    oov = tmp_path / "oov"
    write_phase(oov, tok, {"train": [np.array([tok.cls_token_id, len(tok) + 5], np.uint32)]})
    with pytest.raises(DataError, match="outside the tokenizer"):
        TokenDataset(oov, "train", _rules(tok, max_seq_len=16), tokenizer=tok)[0]


def test_dataset_reads_every_sample_in_index_order(phase, tok):
    ds = TokenDataset(phase, "train", _rules(tok, max_seq_len=64), tokenizer=tok)
    expected = random_samples(120, tok, seed=1)
    assert len(ds) == 120 and len(ds.shards) > 3
    for i in (0, 37, 119):
        sid, ids = ds[i]
        assert sid == i and ids.tolist() == expected[i].tolist()


# --------------------------------------------------------------------------- validation


def _copy(phase, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(phase, dst)
    return dst


def _open(root, tok, split="train"):
    return TokenDataset(root, split, _rules(tok, max_seq_len=64), tokenizer=tok)


def test_missing_split(phase, tok):
    with pytest.raises(DataError, match="split folder .*nope does not exist"):
        _open(phase, tok, "nope")


def test_missing_and_corrupted_index(phase, tok, tmp_path):
    root = _copy(phase, tmp_path)
    index = root / "train" / "index.json"
    good = index.read_text()
    index.write_text(good[:50])
    with pytest.raises(DataError, match="index.json is corrupted"):
        _open(root, tok)
    obj = json.loads(good)
    del obj["shards"][1]["raw_data"]
    index.write_text(json.dumps(obj))
    with pytest.raises(DataError, match="shard #1 lacks raw_data"):
        _open(root, tok)
    index.unlink()
    with pytest.raises(DataError, match="index.json is missing"):
        _open(root, tok)


def test_missing_and_truncated_shard(phase, tok, tmp_path):
    root = _copy(phase, tmp_path)
    shard = root / "train" / "shard.00002.mds"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(
        DataError, match=rf"shard.00002.mds has {len(data) - 10} bytes but .* says {len(data)}"
    ):
        _open(root, tok)
    shard.unlink()
    with pytest.raises(DataError, match="shard.00002.mds listed in .* is missing"):
        _open(root, tok)


def test_wrong_column_type(tmp_path, tok):
    cols = {"input_ids": "ndarray:int64", "source": "str", "id": "str"}
    write_split(tmp_path / "train", random_samples(4, tok), columns=cols)
    with pytest.raises(
        DataError, match="stores 'input_ids' as 'ndarray:int64', expected 'ndarray:uint32'"
    ):
        _open(tmp_path, tok)


def test_empty_split(tmp_path, tok):
    write_phase(tmp_path, tok, {"train": []})
    with pytest.raises(DataError, match="holds no samples"):
        _open(tmp_path, tok)


def test_tokenizer_mismatch_names_the_special_ids(phase, tok, tmp_path):
    root = _copy(phase, tmp_path)
    meta = json.loads((root / "meta.json").read_text())
    meta["tokenizer"]["cls_token_id"] = 0
    meta["tokenizer"]["mask_token_id"] = 1
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError, match=r"cls_token_id: shards 0, tokenizer 61; mask_token_id: shards 1"
    ):
        _open(root, tok)
    meta = json.loads((phase / "meta.json").read_text())
    meta["max_token_id"] = len(tok) + 3
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="has only 68 ids"):
        _open(root, tok)


# --------------------------------------------------------------------------- collation


def test_pad_to_longest(tok):
    col = Collator(pad_id=tok.pad_token_id, max_seq_len=16)
    b = col([(4, 0, np.array([1, 2, 3])), (9, 0, np.array([5]))])
    assert b["input_ids"].tolist() == [[1, 2, 3], [5, tok.pad_token_id, tok.pad_token_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["sample_id"].tolist() == [4, 9] and "labels" not in b
    assert packing_efficiency(b) == pytest.approx(4 / 6)


def test_packing_keeps_sequences_whole_with_segment_ids(tok):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 60, int(n)) for n in rng.integers(1, 17, 40)]
    col = Collator(pad_id=tok.pad_token_id, max_seq_len=16, packing=True)
    items = [(100 + i, 0, s) for i, s in enumerate(seqs)]
    b = col(items)
    again = col(items)
    assert all(torch.equal(b[k], again[k]) for k in b)  # deterministic
    assert b["input_ids"].shape[1] <= 16 and (b["sample_id"] == -1).all()
    seen = {}
    for r in range(b["input_ids"].shape[0]):
        mask, ids, row_ids = b["attention_mask"][r], b["input_ids"][r], b["sample_ids"][r]
        k = int(mask.max())
        assert k == int((row_ids >= 0).sum()) and (row_ids[:k] >= 0).all()
        # segments 1..k appear in order, contiguously, followed only by padding
        segs = mask[mask > 0].tolist()
        assert segs == sorted(segs) and set(segs) == set(range(1, k + 1))
        assert (mask[len(segs) :] == 0).all()
        for s in range(1, k + 1):
            seen[int(row_ids[s - 1])] = ids[mask == s].tolist()
    assert seen == {100 + i: s.tolist() for i, s in enumerate(seqs)}
    total = sum(len(s) for s in seqs)
    assert packing_efficiency(b) == pytest.approx(total / b["attention_mask"].numel())
    assert b["input_ids"].shape[0] < len(seqs)  # it packed


def test_pack_best_fit():
    assert pack([8, 4, 4, 2, 6], 10) == [[0, 3], [4, 1], [2]]
    with pytest.raises(ValueError):
        pack([11], 10)


# --------------------------------------------------------------------------- the DataSpec


def _spec(phase, tok, objective="mlm", split="train", rank=0, world=1, **data):
    batch = data.pop("batch", 8)
    cfg = DataConfig(path=str(phase), max_seq_len=data.pop("max_seq_len", 24), **data)
    return build_dataloader(
        cfg,
        ObjectiveConfig(name=objective),
        tok,
        split=split,
        global_batch_size=batch,
        rank=rank,
        world_size=world,
        seed=5,
        microbatch_size=2,
    )


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_token_counts(phase, tok, objective):
    spec = _spec(phase, tok, objective)
    assert spec.dataloader.batch_size == 8
    batch = next(iter(spec.dataloader))
    real = int((batch["input_ids"] != tok.pad_token_id).sum())
    assert spec.get_num_tokens_in_batch(batch) == real
    assert spec.get_num_samples_in_batch(batch) == 8
    lengths = batch["attention_mask"].sum(1)
    want = int((batch["labels"] != -100).sum()) if objective == "mlm" else int((lengths - 1).sum())
    assert spec.get_num_tokens_in_batch(batch, token_type="loss_generating") == want
    ids = batch["input_ids"]
    assert (ids[:, 0] == tok.cls_token_id).all()
    last = ids[torch.arange(len(ids)), lengths - 1]
    if objective == "mlm":
        assert (last == tok.sep_token_id).all()


def test_eval_is_fixed_and_covers_every_sample_once(phase, tok):
    specs = [_spec(phase, tok, split="val", rank=r, world=2, batch=8) for r in (0, 1)]
    assert specs[0].dataloader.batch_size == 4  # Composer's default eval microbatch reads it
    per_rank = [list(spec.dataloader) for spec in specs]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 21 samples: 8 + 8 + 5
    ids = np.concatenate([b["sample_id"].numpy() for r in (0, 1) for b in per_rank[r]])
    assert sorted(ids.tolist()) == list(range(21))
    again = list(_spec(phase, tok, split="val", rank=0, world=2, batch=8).dataloader)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(per_rank[0], again))
    assert all((b["epoch"] == 0).all() for b in per_rank[0])
    # Composer drops `sampler.total_size - len(dataset)` "padding" samples from the last eval
    # batch (DistributedSampler pads); nothing is padded here, so it must drop none (21 is odd).
    sampler = specs[1].dataloader.batch_sampler
    assert sampler.total_size - len(sampler.dataset) == 0


def test_eval_tail_smaller_than_world_is_merged(phase, tok):
    spec = _spec(
        phase, tok, split="val", rank=0, world=2, batch=10
    )  # 21 = 10 + 11 (tail of 1 merged)
    sizes = [len(b["sample_id"]) for b in spec.dataloader]
    assert sizes == [5, 5]


def test_workers_do_not_change_batches(phase, tok):
    a = list(_spec(phase, tok, num_workers=0).dataloader)[:4]
    b = list(_spec(phase, tok, num_workers=2).dataloader)[:4]
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


# --------------------------------------------------------------------------- the data rooms' imports


def _data_imports() -> dict[str, set[str]]:
    """ettin.data.<module> -> the ettin modules it imports, module- and function-level alike."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "ettin" / "data"
    out: dict[str, set[str]] = {}
    for f in sorted(src.glob("*.py")):
        name = "ettin.data" if f.stem == "__init__" else f"ettin.data.{f.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[name] = {m for m in found if m.startswith("ettin.")}
    return out


def test_data_imports_neither_prep_nor_train_and_has_no_cycle():
    """Issue #23: nothing in ettin.data imports ettin.prep or ettin.train (not even inside a
    function), and the data modules import each other in one direction only."""
    imports = _data_imports()
    upward = sorted(
        f"{m} -> {t}"
        for m, ts in imports.items()
        for t in ts
        if t.startswith(("ettin.prep", "ettin.train"))
    )
    assert not upward, upward
    modules = set(imports)
    graph = {m: {t for t in ts if t in modules and t != m} for m, ts in imports.items()}
    graph.pop("ettin.data")  # the package's lazy names point at every module

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(
            n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ())
        )

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a, {b}))
    assert not cycles, cycles
