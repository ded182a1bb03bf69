"""Data from object stores and compressed shards (issues #18, #17): a real S3-compatible server.

An S3 server (moto in server mode) runs on 127.0.0.1 inside the test session, with fake
credentials; shards made by the test helpers (and by `ettin prep --out s3://...`) are uploaded
to it and trained from with `S3_ENDPOINT_URL`, exactly as against AWS. Checked: a run from
s3:// equals the same run on the local shards (losses and recorded order); the fetch is
parallel, resumable after a kill and refuses a damaged object; wrong endpoints, buckets,
prefixes and credentials fail within seconds naming the fix; hf:// URLs are handled offline;
zstd-compressed shards in the published Ettin form (input_ids + id, no meta.json) train as they
are; `data.order=streaming` stays within its cache limit, resumes exactly, and 2 ranks see the
global batches of 1.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import WORDS, counting_samples, interrupted_fit, losses, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ettin-test"


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on loopback, a bucket, fake credentials and S3_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }
    saved = {k: os.environ.get(k) for k in [*env, "S3_ENDPOINT_URL"]}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["S3_ENDPOINT_URL"] = endpoint
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _upload(local: Path, url: str) -> None:
    from ettin.data.remote import upload_tree

    upload_tree(local, url, quiet=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3):
    """A tiny tokenizer and a `pretrain` phase, locally and at s3://ettin-test/data/pretrain."""
    from helpers import tiny_tokenizer, write_phase

    root = tmp_path_factory.mktemp("remote")
    tok = tiny_tokenizer(num_words=WORDS)
    tok.save_pretrained(root / "tokenizer")
    write_phase(
        root / "data" / "pretrain",
        tok,
        {"train": counting_samples(tok, 400, 0), "val": counting_samples(tok, 48, 1)},
    )
    _upload(root / "data" / "pretrain", f"s3://{BUCKET}/data/pretrain")
    return root


def _overrides(world: Path, run: str, *extra: str) -> list[str]:
    return tiny_overrides(world, run, "callbacks.export_hf=false", *extra)


def _cfg(world: Path, run: str, *extra: str):
    from ettin.config import load_config

    return load_config(ROOT / "yamls/tiny/encoder.yaml", _overrides(world, run, *extra))


def _order(run_dir: Path):
    import pyarrow.dataset as pds

    table = pds.dataset(str(run_dir / "data_order.parquet")).to_table().to_pandas()
    return table.sort_values(["step"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- remote == local


def test_s3_run_equals_the_same_run_on_local_shards(world):
    from ettin.train import train

    extra = ("max_duration=6ba", "eval_interval=3ba")
    train(_cfg(world, "local", *extra))
    cache = world / "cache-s3"
    remote = (f"data.path=s3://{BUCKET}/data/pretrain", f"data.local_cache={cache}")
    train(_cfg(world, "s3", *extra, *remote))
    a, b = losses(world / "runs/local"), losses(world / "runs/s3")
    assert sorted(a) == sorted(b) == list(range(6))
    assert a == b, "the losses of the s3:// run differ from the local run's"
    oa, ob = _order(world / "runs/local"), _order(world / "runs/s3")
    assert oa[["step", "sample_id"]].equals(ob[["step", "sample_id"]])
    # the cache holds exactly the shards (checked), index.json and meta.json; no temp files
    local_files = sorted(p.name for p in (world / "data/pretrain/train").iterdir())
    assert sorted(p.name for p in (cache / "train").iterdir()) == local_files
    assert (cache / "meta.json").exists() and (cache / "val" / "index.json").exists()
    assert not list(cache.rglob(".*"))


# --------------------------------------------------------------------------- the fetch


def test_fetch_is_parallel_resumable_and_checks_every_shard(world, s3, tmp_path, monkeypatch):
    import threading

    from ettin.data import remote as rm
    from ettin.data.dataset import DataError

    url = f"s3://{BUCKET}/data/pretrain"
    threads: set[int] = set()
    calls: list[str] = []
    real = rm._Getter.__call__

    def counting(self, rel, dest):
        threads.add(threading.get_ident())
        calls.append(rel)
        if kill_after[0] is not None and len(calls) > kill_after[0]:
            dest.write_bytes(b"half a shard")  # what a kill mid-download leaves
            raise KeyboardInterrupt("simulated kill")
        return real(self, rel, dest)

    kill_after = [6]
    monkeypatch.setattr(rm._Getter, "__call__", counting)
    with pytest.raises(KeyboardInterrupt):
        rm.fetch_split(url, "train", tmp_path / "c", workers=1, quiet=True)
    split = tmp_path / "c" / "train"
    index = json.loads((world / "data/pretrain/train/index.json").read_text())
    names = [s["raw_data"]["basename"] for s in index["shards"]]
    present = [n for n in names if (split / n).exists()]
    assert 0 < len(present) < len(names)
    assert not (split / "index.json").exists()  # not complete: index.json comes last
    for n in present:  # whatever carries a shard's real name is whole
        assert (split / n).read_bytes() == (world / "data/pretrain/train" / n).read_bytes()
    kill_after[0] = None
    calls.clear()
    rm.fetch_split(url, "train", tmp_path / "c", workers=4, quiet=True)
    fetched = [c for c in calls if c.endswith(".mds")]
    assert len(fetched) == len(names) - len(present)  # only what was missing
    assert len(threads) > 1  # a thread pool did it
    assert not list(split.glob(".*"))
    calls.clear()
    rm.fetch_split(url, "train", tmp_path / "c", quiet=True)
    assert calls == []  # complete: nothing fetched again

    # a damaged object on the server is refused, and never lands under its real name
    bad = bytearray((world / "data/pretrain/train" / names[1]).read_bytes())
    bad[-3] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=f"damaged/train/{names[1]}", Body=bytes(bad))
    for n in [*names[:1], *names[2:], "index.json"]:
        s3.upload_file(str(world / "data/pretrain/train" / n), BUCKET, f"damaged/train/{n}")
    with pytest.raises(DataError, match=f"damaged/train/{names[1]} is corrupted .its xxh64"):
        rm.fetch_split(f"s3://{BUCKET}/damaged", "train", tmp_path / "d", quiet=True)
    assert not (tmp_path / "d" / "train" / names[1]).exists()


def test_remote_errors_are_fast_and_name_the_fix(world, s3, tmp_path, monkeypatch):
    from ettin.data import remote as rm
    from ettin.data.dataset import DataError

    cases = {
        "s3://no-such-bucket/data/pretrain": "bucket 'no-such-bucket' does not exist",
        f"s3://{BUCKET}/wrong/prefix": "does not exist: the bucket is there",
    }
    for url, want in cases.items():
        with pytest.raises(rm.RemoteError, match=want):
            rm.fetch_split(url, "train", tmp_path / "x", quiet=True)
    # a dead endpoint: one quick attempt, no retry storm
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(
        rm.RemoteError, match="cannot reach endpoint http://127.0.0.1:9 .*S3_ENDPOINT_URL"
    ):
        rm.fetch_split(f"s3://{BUCKET}/data/pretrain", "train", tmp_path / "y", quiet=True)
    assert time.perf_counter() - t0 < 5
    # refused or missing credentials name the variables
    from botocore.exceptions import ClientError, NoCredentialsError

    class Denied:
        def __init__(self, unsigned):
            self.unsigned = unsigned

        def head_object(self, **_):
            if not self.unsigned:
                raise NoCredentialsError()
            raise ClientError({"Error": {"Code": "403"}}, "HeadObject")

    monkeypatch.setattr(rm, "_s3_client", lambda unsigned=False, probe=False: Denied(unsigned))
    with pytest.raises(rm.RemoteError, match="no credentials were found: set AWS_ACCESS_KEY_ID"):
        rm.probe_remote(f"s3://{BUCKET}/data/pretrain/train/index.json")
    # a remote path without a cache says what to set
    from helpers import tiny_tokenizer

    from ettin.data.dataset import SampleRules, TokenDataset

    tok = tiny_tokenizer(num_words=WORDS)
    rules = SampleRules.from_tokenizer(tok, max_seq_len=48, encoder=True)
    with pytest.raises(DataError, match="set data.local_cache"):
        TokenDataset(f"s3://{BUCKET}/data/pretrain", "train", rules)


def test_hf_urls_are_handled_offline(tmp_path, monkeypatch):
    from ettin.data import remote as rm
    from ettin.data.dataset import is_remote

    url = "hf://datasets/jhu-clsp/ettin-pretraining-data/phase1"
    assert is_remote(url) and not is_remote(str(tmp_path)) and not is_remote("file:///x")
    assert rm.parse_hf(url + "/train/index.json") == (
        "jhu-clsp/ettin-pretraining-data",
        "phase1/train/index.json",
    )
    with pytest.raises(rm.RemoteError, match="hf://datasets/<org>/<name>"):
        rm.parse_hf("hf://models/x/y")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(rm.RemoteError, match="HF_HUB_OFFLINE is set"):
        rm.fetch_split(url, "train", tmp_path / "cache", quiet=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub

    def unreachable(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(rm.RemoteError, match="from the Hugging Face Hub .*resolve.*HF_TOKEN"):
        rm.fetch_split(url, "train", tmp_path / "cache", quiet=True)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "cache" / "train" / "index.json").exists()


# --------------------------------------------------------------------------- prep --out s3://


def test_prep_writes_to_s3_and_trains_from_there(world, s3, tmp_path):
    import yaml

    from ettin.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        (docs / f"d{i}.txt").write_text(" ".join(f"w{j}" for j in rng.integers(0, WORDS, 80)))
    mixture = {
        "tokenizer": str(world / "tokenizer"),
        "sources": {"docs": {"path": str(docs), "format": "text"}},
        "phases": {"pretrain": {"context_length": 48, "val_fraction": 0.2, "mix": {"docs": {}}}},
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    main(["prep", str(tmp_path / "mix.yaml"), "--out", f"s3://{BUCKET}/prepped", "--quiet"])
    main(["prep", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "local"), "--quiet"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="prepped/")["Contents"]}
    local = {
        "prepped/" + p.relative_to(tmp_path / "local").as_posix()
        for p in (tmp_path / "local").rglob("*")
        if p.is_file()
    }
    assert keys == local and "prepped/pretrain/meta.json" in keys
    assert "prepped/pretrain/stats.json" in keys and "prepped/pretrain/train/index.json" in keys
    from helpers import tiny_tokenizer

    from ettin.data.dataset import SampleRules, TokenDataset

    tok = tiny_tokenizer(num_words=WORDS)
    rules = SampleRules.from_tokenizer(tok, max_seq_len=48, encoder=True)
    a = TokenDataset(tmp_path / "local/pretrain", "train", rules, tokenizer=tok)
    b = TokenDataset(
        f"s3://{BUCKET}/prepped/pretrain", "train", rules, tokenizer=tok,
        local_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    assert len(a) == len(b) > 0
    assert all(np.array_equal(a[i][1], b[i][1]) for i in range(len(a)))


# --------------------------------------------------------------------------- compressed shards


def _write_published_form(split_dir: Path, samples: list[np.ndarray]) -> None:
    """Shards as the published Ettin phases hold them: zstd, input_ids uint32 + id, no meta.json."""
    from streaming import MDSWriter

    with MDSWriter(
        out=str(split_dir),
        columns={"input_ids": "ndarray:uint32", "id": "str"},
        compression="zstd",
        hashes=["sha1", "xxh64"],
        size_limit=2048,
    ) as w:
        for i, ids in enumerate(samples):
            w.write({"input_ids": ids, "id": f"doc{i}"})
    for raw in split_dir.glob("*.mds"):
        raw.unlink()  # MDSWriter keeps only the .zstd files anyway; make sure


def test_zstd_shards_train_as_they_are(world, s3, tmp_path, capsys):
    from helpers import tiny_tokenizer

    from ettin.cli import main
    from ettin.data.dataset import DataError, SampleRules, TokenDataset

    tok = tiny_tokenizer(num_words=WORDS)
    samples = counting_samples(tok, 200, 5)
    split = tmp_path / "phase" / "train"
    _write_published_form(split, samples)
    assert list(split.glob("*.mds.zstd")) and not list(split.glob("*.mds"))
    rules = SampleRules.from_tokenizer(tok, max_seq_len=48, encoder=True)

    with pytest.raises(DataError, match="ettin data decompress .*or set data.local_cache"):
        TokenDataset(tmp_path / "phase", "train", rules, tokenizer=tok)
    # read through data.local_cache: decompressed there, the split left as it is
    cached = TokenDataset(
        tmp_path / "phase", "train", rules, tokenizer=tok, local_cache=str(tmp_path / "c")
    )
    assert [cached.raw(i).tolist() for i in range(len(samples))] == [s.tolist() for s in samples]
    assert not list(split.glob("*.mds"))
    # from s3, compressed: fetched compressed, decompressed and checked in the cache
    _upload(tmp_path / "phase", f"s3://{BUCKET}/zstd")
    remote = TokenDataset(
        f"s3://{BUCKET}/zstd", "train", rules, tokenizer=tok, local_cache=str(tmp_path / "c2")
    )
    assert len(remote) == len(samples)
    assert not list((tmp_path / "c2" / "train").glob("*.zstd"))
    # ettin data decompress: in place, checked, idempotent
    main(["data", "decompress", str(split), "--quiet"])
    out = capsys.readouterr().out
    n = len(list(split.glob("*.mds.zstd")))
    assert f"decompressed {n} shards (0 already readable)" in out
    main(["data", "decompress", str(tmp_path / "phase"), "--quiet"])
    assert f"decompressed 0 shards ({n} already readable)" in capsys.readouterr().out
    local = TokenDataset(tmp_path / "phase", "train", rules, tokenizer=tok)
    assert [local.raw(i).tolist() for i in range(len(samples))] == [s.tolist() for s in samples]
    # a damaged compressed shard is named, and nothing half-made is left behind
    victim = sorted(split.glob("*.mds.zstd"))[0]
    victim.with_suffix("").unlink()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SystemExit):
        try:
            main(["data", "decompress", str(split), "--quiet"])
        except DataError as err:
            assert victim.name in str(err) and "is corrupted" in str(err)
            raise SystemExit(1) from None
    assert not victim.with_suffix("").exists() and not list(split.glob(".*"))
    # without meta.json, foreign shards are still refused by the first-token check
    other = tmp_path / "foreign" / "train"
    _write_published_form(other, [np.asarray([5, 6, 7, tok.sep_token_id], np.uint32)] * 20)
    with pytest.raises(DataError, match="starts with id 5, not the tokenizer's \\[CLS\\]"):
        TokenDataset(
            tmp_path / "foreign", "train", rules, tokenizer=tok, local_cache=str(tmp_path / "c3")
        )


# --------------------------------------------------------------------------- data.order=streaming


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_streaming_order_stays_in_its_cache_limit_and_resumes_exactly(world):
    from composer.core import Callback

    from ettin.train import build_trainer, train

    limit = 30 * 1024  # the split is ~71 kB: a 14-kB index.json and 2-kB shards
    split_bytes = _dir_bytes(world / "data/pretrain/train")
    assert split_bytes > 2 * limit
    peak = [0]

    def common(cache):
        return (
            "max_duration=10ba",
            "save_interval=5ba",
            "eval_interval=100ba",
            "data.order=streaming",
            f"data.path=s3://{BUCKET}/data/pretrain",
            f"data.local_cache={cache}",
            f"data.cache_limit={limit}b",
            "data.shuffle_block_size=64",
        )

    class Watch(Callback):
        def __init__(self, cache):
            self.cache = cache

        def batch_end(self, state, logger):
            now = _dir_bytes(self.cache / "train")
            if now > peak[0]:
                peak[0] = now
                peak.append(
                    sorted((p.name, p.stat().st_size) for p in (self.cache / "train").iterdir())
                )

    cache = world / "stream-a"
    trainer = build_trainer(_cfg(world, "stream-straight", *common(cache)))
    trainer.state.callbacks.append(Watch(cache))
    trainer.fit()
    trainer.close()
    del trainer
    gc.collect()
    assert 0 < peak[0] <= limit, (peak[0], limit, len(peak[-1]), peak[-1][-4:])

    cache_b = world / "stream-b"
    cfg = _cfg(world, "stream-killed", *common(cache_b))
    interrupted_fit(cfg, 7)
    train(cfg)  # autoresume from step 5, Streaming's state restored by Composer
    straight, resumed = (
        losses(world / "runs/stream-straight"),
        losses(world / "runs/stream-killed"),
    )
    assert sorted(straight) == sorted(resumed) == list(range(10))
    assert straight == resumed
    a, b = _order(world / "runs/stream-straight"), _order(world / "runs/stream-killed")
    assert a[["step", "sample_id"]].equals(b[["step", "sample_id"]])
    # Streaming's order, not the global permutation's, and no sample twice in the epoch
    assert a.sample_id.nunique() == len(a)


@pytest.mark.slow
def test_streaming_order_two_ranks_see_the_global_batches_of_one(world):
    from ettin.train import train

    common = (
        "max_duration=6ba",
        "eval_interval=100ba",
        "data.order=streaming",
        f"data.path=s3://{BUCKET}/data/pretrain",
        "data.cache_limit=30kb",
        "data.shuffle_block_size=64",
    )
    train(_cfg(world, "stream-one", *common, f"data.local_cache={world / 'stream-one'}"))
    over = _overrides(world, "stream-two", *common, f"data.local_cache={world / 'stream-two'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "-m", "ettin.train"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "yamls/tiny/encoder.yaml"), *over],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _order(world / "runs/stream-one"), _order(world / "runs/stream-two")
    for step in range(6):
        assert sorted(one[one.step == step].sample_id) == sorted(two[two.step == step].sample_id)
    a, b = losses(world / "runs/stream-one"), losses(world / "runs/stream-two")
    assert sorted(a) == sorted(b) == list(range(6))
    for k in a:
        assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])


# --------------------------------------------------------------------------- the published artefacts


def _put(s3, key: str, path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())


def test_order_tree_from_s3_trains_every_row_once_and_collisions_stop(world, s3, tmp_path):
    """An order tree of two folders of one phase (steps restarting at 1, the same part names in
    both) trains from s3:// with every row exactly once: the cache keeps each part's relative
    path (before: cached under bare names, half the rows were silently lost). Two parts that
    would land on one cache file stop the run naming both, before anything is downloaded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import write_order_tree
    from test_replay import _tree_cfg, assert_each_once, trained_rows
    from transformers import AutoTokenizer

    from ettin.train import build_trainer

    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    local = tmp_path / "tree"
    rows = write_order_tree(local, tok, {"checkpoint_000000": 4, "checkpoint_000001": 4}, batch=8)
    parts = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.parquet"))
    for rel in parts:
        _put(s3, f"order/{rel}", local / rel)
    cache = tmp_path / "cache"
    url = f"s3://{BUCKET}/order"
    cfg = _tree_cfg(world, "tree-s3", url, "max_duration=8ba", f"data.local_cache={cache}")
    assert_each_once(trained_rows(cfg), rows["checkpoint_000000"] + rows["checkpoint_000001"])
    cached = [p.relative_to(cache / "order_file") for p in cache.rglob("*.parquet")]
    assert sorted(p.as_posix().split("/", 1)[1] for p in cached) == parts
    # two parts whose paths differ only in case would share a file on a case-insensitive disk
    part = local / "checkpoint_000001" / "steps_000001_to_000002.parquet"
    _put(s3, "clash/ext_000000/steps_000001_to_000002.parquet", part)
    table = pq.read_table(part)
    later = table.set_column(0, "step", pa.array(table.column("step").to_numpy() + 2, pa.int64()))
    pq.write_table(later, tmp_path / "later.parquet")
    _put(s3, "clash/ext_000000/STEPS_000001_to_000002.parquet", tmp_path / "later.parquet")
    clash = f"data.local_cache={tmp_path / 'cache2'}"
    bad = _tree_cfg(world, "tree-clash", f"s3://{BUCKET}/clash", "max_duration=2ba", clash)
    with pytest.raises(
        ValueError,
        match=r"parts ext_000000/STEPS_000001_to_000002.parquet and "
        r"ext_000000/steps_000001_to_000002.parquet would be stored as one file",
    ):
        build_trainer(bad)
    assert not list((tmp_path / "cache2").rglob("*.parquet"))


def test_subfolder_zstd_phase_trains_via_local_cache_and_validation_is_found(
    world, s3, tmp_path, capsys
):
    """A phase as published: per-source subfolders of zstd shards (the reference's MDSWriter)
    merged into one index per split, splits `train` and `validation`, no meta.json. It trains
    through data.local_cache (decompressed into the cache's subfolders, which used to fail as
    'damaged'), evaluates on `validation` with the default data.eval_split=val, `ettin data
    verify` / `decompress` treat each split as one, and it is fetched from s3:// alike."""
    from helpers import metric_rows, write_reference_phase
    from transformers import AutoTokenizer

    from ettin.cli import main
    from ettin.data.dataset import SampleRules, TokenDataset
    from ettin.train import train

    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    train_rows = {"dclm": counting_samples(tok, 120, 11), "books": counting_samples(tok, 80, 12)}
    val_rows = {"dclm": counting_samples(tok, 24, 13), "books": counting_samples(tok, 16, 14)}
    splits = {"train": train_rows, "validation": val_rows}
    phase = write_reference_phase(tmp_path / "pretrain", splits)
    index = json.loads((phase / "train" / "index.json").read_text())
    sources = [s["zip_data"]["basename"].split("/")[0] for s in index["shards"]]
    assert set(sources) == {"dclm", "books"}
    n_all = sum(len(json.loads((phase / s / "index.json").read_text())["shards"]) for s in splits)
    assert not list(phase.rglob("*.mds")) and not (phase / "val").exists()
    cache = tmp_path / "cache"
    run = (f"data.path={phase}", f"data.local_cache={cache}", "max_duration=4ba")
    train(_cfg(world, "reference-phase", *run, "eval_interval=2ba"))
    rows = metric_rows(world / "runs/reference-phase")
    assert any("metrics/val/CrossEntropy" in r for r in rows), "no evaluation ran"
    assert sorted(losses(world / "runs/reference-phase")) == list(range(4))
    assert (cache / "train" / "dclm").is_dir() and (cache / "validation" / "books").is_dir()
    rules = SampleRules.from_tokenizer(tok, max_seq_len=48, encoder=True)
    cached = TokenDataset(cache, "train", rules, tokenizer=tok)
    want = [row.tolist() for src in dict.fromkeys(sources) for row in train_rows[src]]
    assert [cached.raw(i).tolist() for i in range(len(cached))] == want  # merged index order
    # verify and decompress see two splits (the per-source index.json files belong to them)
    main(["data", "verify", str(cache), "--quiet"])
    assert f"OK: {n_all} shards in 2 splits under {cache}" in capsys.readouterr().out
    main(["data", "decompress", str(phase), "--quiet"])
    out = capsys.readouterr().out
    assert f"decompressed {n_all} shards (0 already readable) in 2 splits under" in out
    assert len(list(phase.rglob("*.mds"))) == n_all
    main(["data", "verify", str(phase), "--quiet"])
    assert "in 2 splits under" in capsys.readouterr().out
    # from s3: fetched compressed into the cache's subfolders, checked; `validation` found
    _upload(phase, f"s3://{BUCKET}/reference/pretrain")
    remote = TokenDataset(
        f"s3://{BUCKET}/reference/pretrain",
        "val",
        rules,
        tokenizer=tok,
        local_cache=str(tmp_path / "c2"),
    )
    assert remote.split == "validation" and len(remote) == 40
    assert (tmp_path / "c2" / "validation" / "dclm").is_dir()
    assert not list((tmp_path / "c2").rglob("*.zstd"))


# --------------------------------------------------------------------------- file:// URLs


def test_file_urls_name_local_folders(tmp_path):
    """`data.path=file:///abs` and `data.order_file=file:///abs` (percent-escapes decoded) are
    the local folders they name, not the relative `file:/abs` that `Path` makes of them."""
    from helpers import tiny_tokenizer, write_order_tree, write_phase

    from ettin.config import load_config
    from ettin.data.dataset import SampleRules, TokenDataset
    from ettin.data.replay import open_train_data

    tok = tiny_tokenizer(num_words=WORDS)
    base = tmp_path / "my data"  # the space is %20 in the URL
    tok.save_pretrained(base / "tokenizer")
    phase = write_phase(base / "pretrain", tok, {"train": counting_samples(tok, 40, 0)})
    assert "%20" in phase.as_uri() and phase.as_uri().startswith("file:///")
    rules = SampleRules.from_tokenizer(tok, max_seq_len=48, encoder=True)
    ds = TokenDataset(phase.as_uri(), "train", rules, tokenizer=tok)
    assert ds.root == phase and len(ds) == 40

    rows = write_order_tree(base / "order", tok, {"checkpoint_000000": 3}, batch=2)
    cfg = load_config(
        ROOT / "yamls/tiny/encoder.yaml",
        [
            f"tokenizer={base / 'tokenizer'}",
            f"data.path={phase.as_uri()}",
            f"data.order_file={(base / 'order').as_uri()}",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    data, replay = open_train_data(cfg.data, rules, tok)
    assert replay.num_steps == 3 and replay.has_tokens and len(data) == 6
    assert replay.parts[0].is_relative_to(base / "order")
    assert [data.raw(i).tolist() for i in range(6)] == rows["checkpoint_000000"]
    cfg.data.order_file = None  # the shards themselves, through the config's file:// path
    shards, _ = open_train_data(cfg.data, rules, tok)
    assert shards.root == phase and len(shards) == 40

    from ettin.data.shards import DataError, local_path

    assert local_path("file://localhost/x/y") == "/x/y" and local_path("s3://b/x") == "s3://b/x"
    with pytest.raises(DataError, match="host 'elsewhere'"):
        local_path("file://elsewhere/x")
