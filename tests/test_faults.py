"""Faults a long run meets, each ending as the user should see it (issue #14).

Real processes killed with SIGKILL (during training and while a checkpoint is being written),
a full disk while saving, a rerun of a finished run, damaged or mismatched shards, misspelt
keys typed at the real entry points, duplicated metric rows after a resume, order audits, and
the choice of the newest checkpoint. Training runs use the suite's real settings (dropout 0.1).
The real-kill cases beyond the first, CLM and two ranks are `slow` (`make test-slow`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    WORDS,
    counting_samples,
    free_port,
    interrupted_fit,
    losses,
    metric_rows,
    tiny_overrides,
    write_world,
)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
COMPOSER = str(Path(sys.executable).with_name("composer"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("ETTIN_DEBUG", None)
# the killer script imports `helpers` (its `stop_at`) from this folder
ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), ENV.get("PYTHONPATH")) if p)

# Runs ettin's training entry after arranging its own SIGKILL (no hooks in the library):
#   ETTIN_TEST_KILL=batch:K  kill -9 at the end of batch K (rank 0), after the checkpoints before it
#   ETTIN_TEST_KILL=save:K   kill -9 halfway through writing the checkpoint of batch K
#   ETTIN_TEST_KILL=full:K   the disk fills halfway through writing it (OSError ENOSPC)
KILLER = """
import errno, io, os, signal, sys
import torch
mode, at = os.environ["ETTIN_TEST_KILL"].split(":")
at = int(at)
if mode == "batch":
    import ettin.train as entry
    from helpers import stop_at
    build = entry.build_trainer
    def build_trainer(cfg):
        trainer = build(cfg)
        trainer.state.callbacks.append(stop_at(at, kill=True))
        return trainer
    entry.build_trainer = build_trainer
else:
    import composer.utils.checkpoint as ckpt
    write = ckpt._write_checkpoint_file
    def partial_write(state_dict, filename):
        if f"-ba{at}-" not in os.path.basename(filename):
            return write(state_dict, filename)
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        data = buf.getvalue()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        if mode == "save":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    ckpt._write_checkpoint_file = partial_write
from ettin.train import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_world(tmp_path_factory.mktemp("faults"))
    (root / "killer.py").write_text(KILLER)
    return root


def _overrides(world: Path, run: str, objective: str, *extra: str) -> list[str]:
    """The tiny run with the suite's dropout (0.1), no export."""
    quiet = ("callbacks.export_hf=false", "logging.console_interval=1000ba")
    return tiny_overrides(world, run, *quiet, *extra, objective=objective, dropout=None)


def _cmd(world: Path, script: str, overrides: list[str], ranks: int = 1) -> list[str]:
    path = str(world / "killer.py") if script == "killer" else str(ROOT / "src/main.py")
    yaml = str(ROOT / "yamls/tiny/encoder.yaml")
    if ranks == 1:
        return [PY, path, yaml, *overrides]
    return [COMPOSER, "-n", str(ranks), "--master_port", str(free_port()), path, yaml, *overrides]


def _run(world, overrides, *, script="main", ranks=1, kill=None, timeout=300):
    env = dict(ENV, ETTIN_TEST_KILL=kill) if kill else ENV
    return subprocess.run(
        _cmd(world, script, overrides, ranks),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=world,
    )


def _assert_each_step_once(run_dir: Path) -> None:
    keys = [(r["batch"], tuple(sorted(r))) for r in metric_rows(run_dir)]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes, f"rows logged twice in {run_dir / 'metrics.jsonl'}: {dupes[:5]}"


def _assert_same_run(straight: Path, resumed: Path, steps: int) -> None:
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(steps)), (sorted(a), sorted(b))
    diffs = [(k, a[k], b[k]) for k in a if a[k] != b[k]]
    assert not diffs, f"losses differ after the resume (step, straight, resumed): {diffs[:4]}"
    _assert_each_step_once(resumed)


def _out(proc) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


# --------------------------------------------------------------------------- real kills


@pytest.fixture(scope="module")
def straight_mlm(world):
    """An uninterrupted 12-step MLM run (dropout 0.1, checkpoints at 6 and 12), in-process with
    one thread like the subprocesses (in-process and subprocess runs agree bit for bit)."""
    from ettin.train import train

    overrides = _overrides(world, "straight-mlm", "mlm", "max_duration=12ba", "save_interval=6ba")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_train_cfg(world, "straight-mlm", "max_duration=12ba", "save_interval=6ba"))
    finally:
        torch.set_num_threads(before)
    return world / "runs" / "straight-mlm", overrides


def test_kill9_while_writing_a_checkpoint_resumes_exactly(world, straight_mlm):
    """kill -9 halfway through writing the step-12 checkpoint: the partial file is moved aside,
    the rerun resumes from step 6 and its losses equal the uninterrupted run's, bit for bit."""
    straight, _ = straight_mlm
    run = "killed-in-save"
    overrides = _overrides(world, run, "mlm", "max_duration=12ba", "save_interval=6ba")
    proc = _run(world, overrides, script="killer", kill="save:12")
    assert proc.returncode == -signal.SIGKILL, _out(proc)
    ckpts = world / "runs" / run / "checkpoints"
    assert (ckpts / "ep0-ba12-rank0.pt").exists()  # the partial file the kill left
    assert os.readlink(ckpts / "latest-rank0.pt") == "ep0-ba6-rank0.pt"

    again = _run(world, overrides)
    assert again.returncode == 0, _out(again)
    assert f"resuming {run} from {ckpts / 'ep0-ba6-rank0.pt'} (batch 6)" in again.stdout
    assert "moved 1 incomplete file(s)" in again.stdout
    assert (ckpts / "incomplete" / "ep0-ba12-rank0.pt").exists()
    assert os.readlink(ckpts / "latest-rank0.pt") == "ep0-ba12-rank0.pt"
    _assert_same_run(straight, world / "runs" / run, 12)


@pytest.fixture()
def one_thread():
    """In-process runs use the subprocesses' thread count (OMP_NUM_THREADS=1), so the float
    reductions, and hence the losses, are comparable bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_cfg(world: Path, run: str, *extra: str):
    from ettin.config import load_config

    return load_config(ROOT / "yamls/tiny/encoder.yaml", _overrides(world, run, "mlm", *extra))


def test_rerun_of_a_finished_run_says_so_and_exits_0(world, straight_mlm, capsys):
    from ettin.train import main

    straight, overrides = straight_mlm
    before = (straight / "metrics.jsonl").read_text()
    main([str(ROOT / "yamls/tiny/encoder.yaml"), *overrides])  # returns: exit status 0
    out = capsys.readouterr().out
    assert "run straight-mlm is already finished: 12 batches, max_duration=12ba" in out
    assert f"Outputs: {straight}" in out
    assert (straight / "metrics.jsonl").read_text() == before


def test_full_disk_while_saving_resumes_from_the_last_complete_checkpoint(
    world, straight_mlm, one_thread, monkeypatch, capsys
):
    import errno

    import composer.utils.checkpoint as ckpt

    from ettin.train import train

    straight, _ = straight_mlm
    write = ckpt._write_checkpoint_file

    def disk_full(state_dict, filename):
        if "-ba12-" not in filename:
            return write(state_dict, filename)
        Path(filename).write_bytes(b"PK\x03\x04" + bytes(1000))  # what fitted on the disk
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    cfg = _train_cfg(world, "disk-full", "max_duration=12ba", "save_interval=6ba")
    monkeypatch.setattr(ckpt, "_write_checkpoint_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.setattr(ckpt, "_write_checkpoint_file", write)
    capsys.readouterr()
    train(cfg)
    out = capsys.readouterr().out
    assert "resuming disk-full from" in out and "(batch 6); moved 1 incomplete file(s)" in out
    _assert_same_run(straight, Path(cfg.run_dir), 12)


def _kill_when(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    """SIGKILL the whole process group once a loss row for `step` or later is written."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists():
            rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.endswith("}")]
            if any("loss/train/total" in r and r["batch"] >= step for r in rows):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before step {step}: rc {proc.poll()}")


def _external_kill_case(world, objective: str, ranks: int) -> None:
    extra = ("max_duration=30ba", "save_interval=10ba")
    tag = f"{objective}-{ranks}r"
    straight = _overrides(world, f"straight-{tag}", objective, *extra)
    proc = _run(world, straight, ranks=ranks)
    assert proc.returncode == 0, _out(proc)

    run_dir = world / "runs" / f"killed-{tag}"
    overrides = _overrides(world, f"killed-{tag}", objective, *extra)
    victim = subprocess.Popen(
        _cmd(world, "main", overrides, ranks),
        env=ENV,
        cwd=world,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _kill_when(victim, run_dir, 13)
    assert not (run_dir / "DONE").exists()
    again = _run(world, overrides, ranks=ranks)
    assert again.returncode == 0, _out(again)
    assert f"resuming killed-{tag} from" in again.stdout, _out(again)
    _assert_same_run(world / "runs" / f"straight-{tag}", run_dir, 30)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_kill9_during_training_resumes_exactly(world, objective):
    _external_kill_case(world, objective, ranks=1)


@pytest.mark.slow
def test_kill9_two_ranks_during_training_resumes_exactly(world):
    _external_kill_case(world, "mlm", ranks=2)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_kill9_two_ranks_while_writing_a_checkpoint(world, objective):
    extra = ("max_duration=12ba", "save_interval=6ba")
    straight = _overrides(world, f"straight-save-{objective}-2r", objective, *extra)
    proc = _run(world, straight, ranks=2)
    assert proc.returncode == 0, _out(proc)
    run = f"killed-save-{objective}-2r"
    overrides = _overrides(world, run, objective, *extra)
    proc = _run(world, overrides, script="killer", ranks=2, kill="save:12")
    assert proc.returncode != 0, _out(proc)
    again = _run(world, overrides, ranks=2)
    assert again.returncode == 0, _out(again)
    assert "(batch 6); moved 1 incomplete file(s)" in again.stdout, _out(again)
    _assert_same_run(world / "runs" / f"straight-save-{objective}-2r", world / "runs" / run, 12)


def test_interrupted_run_resumes_with_dropout_and_logs_each_step_once(
    world, straight_mlm, one_thread
):
    """In-process: stop after step 8 (checkpoint at 6), rerun; dropout 0.1 stays exact and
    metrics.jsonl keeps one copy of every row."""
    from ettin.train import train

    straight, _ = straight_mlm
    cfg = _train_cfg(world, "interrupted", "max_duration=12ba", "save_interval=6ba")
    assert cfg.model.attn_out_dropout == 0.1
    interrupted_fit(cfg, 8)
    torch.manual_seed(1234)  # whatever the process did before, the rerun must not depend on it
    train(cfg)
    _assert_same_run(straight, Path(cfg.run_dir), 12)


# --------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(path: Path, batch: int) -> None:
    stamp = {"Timestamp": {"batch": batch, "epoch": 0}}  # as Composer 0.32.1 stores it
    torch.save({"state": {"timestamp": stamp, "model": {}}}, path)


def test_newest_checkpoint_is_found_by_step_not_by_name(tmp_path):
    from ettin.checkpoint import CheckpointInfo, read_checkpoint, save_ettin_checkpoint
    from ettin.model import EttinModel, model_args

    model = EttinModel(model_args("test", vocab_size=64, pad_token_id=3))
    info = CheckpointInfo(model_args=model.args, objective="mlm")
    for batch in (20, 100):
        info.lineage = {"batch": batch}
        save_ettin_checkpoint(tmp_path / f"ep0-ba{batch}-rank0.pt", model, info)
    (tmp_path / "ep0-ba200-rank0.pt").write_bytes(b"PK\x03\x04 partial")  # a kill mid-write
    _, got = read_checkpoint(tmp_path)  # no latest-rank0.pt
    assert got.lineage == {"batch": 100}


def test_prepare_resume_moves_partial_files_and_repoints_latest(tmp_path):
    from ettin.checkpoint import prepare_resume

    for batch in (6, 12):
        _fake_checkpoint(tmp_path / f"ep0-ba{batch}-rank0.pt", batch)
    data = (tmp_path / "ep0-ba12-rank0.pt").read_bytes()
    (tmp_path / "ep0-ba18-rank0.pt").write_bytes(data[: len(data) // 2])
    os.symlink("ep0-ba6-rank0.pt", tmp_path / "latest-rank0.pt")  # killed before it moved on
    point = prepare_resume(tmp_path)
    assert point.checkpoint == tmp_path / "ep0-ba12-rank0.pt" and point.batch == 12
    assert point.moved == [tmp_path / "incomplete" / "ep0-ba18-rank0.pt"]
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba12-rank0.pt"
    # everything incomplete: no latest at all (a fresh start), nothing left to conflict
    for p in tmp_path.glob("ep*.pt"):
        p.write_bytes(b"")
    assert prepare_resume(tmp_path).checkpoint is None
    assert not (tmp_path / "latest-rank0.pt").is_symlink()
    assert not list(tmp_path.glob("ep*.pt"))


# --------------------------------------------------------------------------- shards


@pytest.fixture()
def tok():
    from helpers import tiny_tokenizer

    return tiny_tokenizer(num_words=WORDS)


def _phase(root: Path, tok, n: int = 1026, *, size_limit=None, tokenizer=None) -> Path:
    from helpers import write_phase

    return write_phase(
        root,
        tokenizer or tok,
        {"train": counting_samples(tokenizer or tok, n, 5)},
        size_limit=size_limit,
    )


def _open(root: Path, tok):
    from ettin.data import SampleRules, TokenDataset

    rules = SampleRules.from_tokenizer(tok, max_seq_len=64, encoder=True)
    return TokenDataset(root, "train", rules, tokenizer=tok)


def _flip_middle(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_flipped_bytes_are_reported_as_corruption(tmp_path, tok, capsys):
    from ettin.cli import main
    from ettin.data import DataError

    root = _phase(tmp_path / "p", tok)
    shard = root / "train" / "shard.00000.mds"
    _flip_middle(shard)
    with pytest.raises(DataError) as err:
        _open(root, tok)  # before step 1 (a small split has its hashes checked at build)
    msg = str(err.value)
    assert f"shard file {shard} is corrupted" in msg and "re-download" in msg
    assert "tokenizer" not in msg

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "verify", str(root), "--quiet"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert f"CORRUPT: shard file {shard} is corrupted" in out and "Re-run `ettin prep`" in out


def test_corrupted_sample_met_during_training_blames_the_shard(tmp_path, tok, monkeypatch):
    import ettin.data.dataset as dataset
    from ettin.data import DataError

    root = _phase(tmp_path / "p", tok)
    shard = root / "train" / "shard.00000.mds"
    _flip_middle(shard)
    monkeypatch.setattr(dataset, "HASH_CHECK_MAX_BYTES", 0)  # as for a split too big to hash
    ds = _open(root, tok)
    errors = []
    for i in range(len(ds)):
        try:
            ds[i]
        except DataError as e:
            errors.append(str(e))
    assert errors, "the flipped bytes went unnoticed"
    for msg in errors:
        assert f"shard file {shard} is corrupted" in msg and "re-download" in msg, msg
        assert "made with another tokenizer" not in msg, msg


def test_verify_passes_on_intact_prep_output_and_fails_on_one_flipped_byte(tmp_path, tok, capsys):
    """A real `ettin prep` (a tiny mixture of text files, the tiny tokenizer), then `ettin data
    verify`: OK, every shard's content hash checked; one byte flipped in one shard fails it."""
    import yaml

    from ettin.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"doc{i:02d}.txt").write_text(
            " ".join(f"w{(7 * i + j) % WORDS}" for j in range(150))
        )
    tok.save_pretrained(tmp_path / "tok")
    mixture = {
        "tokenizer": str(tmp_path / "tok"),
        "shard_size": "2kb",
        "sources": {"docs": {"path": str(docs), "format": "text"}},
        "phases": {
            "p": {"context_length": 64, "val_fraction": 0.25, "seed": 0, "mix": {"docs": {}}}
        },
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    main(["prep", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    phase = tmp_path / "out" / "p"
    capsys.readouterr()
    indexes = [json.loads((phase / s / "index.json").read_text()) for s in ("train", "val")]
    n = sum(len(i["shards"]) for i in indexes)
    assert n >= 4 and len(indexes[0]["shards"]) >= 2  # several shards, in both splits
    main(["data", "verify", str(phase), "--quiet"])
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {n} shards in 2 splits under {phase}"), out
    assert f"{n} match their recorded content hashes" in out and "no content hash" not in out

    shard = phase / "train" / indexes[0]["shards"][1]["raw_data"]["basename"]
    data = bytearray(shard.read_bytes())
    data[len(data) - 3] ^= 0x01  # one bit of one token id: sizes and headers stay right
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "verify", str(phase), "--quiet"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert f"CORRUPT: shard file {shard} is corrupted" in out and f"1 of {n} shards" in out


def _reference_tree(root: Path, tok, **kwargs) -> Path:
    """A phase as the reference's writer leaves it: zstd-only shards, `train/<source>/<chunk>/`
    (two levels, each with its own index.json) merged into the split's index.json."""
    from helpers import write_reference_phase

    train = {"dclm": counting_samples(tok, 90, 1), "books": counting_samples(tok, 60, 2)}
    val = {"dclm": counting_samples(tok, 20, 3)}
    return write_reference_phase(root, {"train": train, "validation": val}, chunks=2, **kwargs)


def test_verify_reference_written_data_says_what_it_checked(tmp_path, tok, capsys):
    """The reference writer's data: no hashes (`hashes: {}`), zstd only (no raw `.mds`), nested
    per source and per chunk. Verify passes on it intact, counts 2 splits, and says that it
    checked sizes and headers (no hashes to check) of the decompressed compressed files; a
    truncated compressed shard, or one whose decompressed header disagrees with index.json, fails
    by name."""
    from ettin.cli import main

    phase = _reference_tree(tmp_path / "p", tok, hashes=())
    index = json.loads((phase / "train" / "index.json").read_text())
    assert {s["raw_data"]["basename"].count("/") for s in index["shards"]} == {2}
    assert (phase / "train" / "dclm" / "index.json").is_file()
    assert (phase / "train" / "dclm" / "chunk_1" / "index.json").is_file()
    assert all(not s["raw_data"]["hashes"] and not s["zip_data"]["hashes"] for s in index["shards"])
    assert not list(phase.rglob("*.mds"))
    n = sum(
        len(json.loads((phase / s / "index.json").read_text())["shards"])
        for s in ("train", "validation")
    )
    main(["data", "verify", str(phase), "--quiet"])
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {n} shards in 2 splits under {phase}"), out
    assert f"{n} have no content hash in index.json" in out and f"{n} are only compressed" in out
    main(["data", "verify", str(phase / "train"), "--quiet"])
    assert f"OK: {len(index['shards'])} shards in 1 split under" in capsys.readouterr().out

    first = phase / "train" / index["shards"][0]["zip_data"]["basename"]
    first.write_bytes(first.read_bytes()[:-5])
    second = index["shards"][1]
    claimed = second["samples"] + 1  # index.json no longer fits the decompressed header
    second["samples"] = claimed
    (phase / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit):
        main(["data", "verify", str(phase), "--quiet"])
    out = capsys.readouterr().out
    assert f"compressed shard file {first} has" in out and "truncated" in out
    name = Path(second["zip_data"]["basename"]).name
    assert f"holds {claimed} samples, but the shard file's own header says {claimed - 1}" in out
    assert f"shard {name} holds" in out and f"2 of {n} shards in 2 splits" in out


def test_verify_checks_the_hashes_of_compressed_only_shards(tmp_path, tok, capsys):
    """Compressed-only shards whose index.json records hashes: a flipped byte of the `.zstd`
    file is found by its hash (no decompression can be trusted to notice it)."""
    from ettin.cli import main

    phase = _reference_tree(tmp_path / "p", tok, hashes=("sha1", "xxh64"))
    n = sum(
        len(json.loads((phase / s / "index.json").read_text())["shards"])
        for s in ("train", "validation")
    )
    main(["data", "verify", str(phase), "--quiet"])
    out = capsys.readouterr().out
    assert f"{n} match their recorded content hashes" in out and f"{n} are only compressed" in out
    zipped = sorted((phase / "train" / "books").rglob("*.zstd"))[0]
    _flip_middle(zipped)
    with pytest.raises(SystemExit):
        main(["data", "verify", str(phase), "--quiet"])
    assert f"CORRUPT: shard file {zipped} is corrupted" in capsys.readouterr().out


@pytest.mark.parametrize("claimed", [1000, 1100])
def test_index_sample_count_must_match_the_shard_header(tmp_path, tok, claimed):
    from ettin.data import DataError

    root = _phase(tmp_path / "p", tok)
    index_file = root / "train" / "index.json"
    index = json.loads(index_file.read_text())
    assert index["shards"][0]["samples"] == 1026
    index["shards"][0]["samples"] = claimed
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        DataError,
        match=rf"says shard shard.00000.mds holds {claimed} samples, but the shard file's own "
        rf"header says 1026",
    ):
        _open(root, tok)


def test_foreign_shards_without_meta_json_are_refused(tmp_path, tok):
    from helpers import tiny_tokenizer

    from ettin.data import DataError

    other = tiny_tokenizer(num_words=40)  # its [CLS] is id 41, an ordinary word of ours
    root = _phase(tmp_path / "p", tok, 50, tokenizer=other)
    (root / "meta.json").unlink()
    with pytest.raises(
        DataError,
        match=rf"meta.json is missing.*starts with id 41, not the tokenizer's \[CLS\] id "
        rf"{tok.cls_token_id}: the shards were made with another tokenizer",
    ):
        _open(root, tok)
    ours = _phase(tmp_path / "q", tok, 50)
    (ours / "meta.json").unlink()
    assert len(_open(ours, tok)) == 50  # our own shards still load without it


# --------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("entry", ["python", "composer"])
def test_misspelt_key_is_one_line_at_every_entry_point(world, entry):
    yaml = str(ROOT / "yamls/tiny/encoder.yaml")
    main = str(ROOT / "src/main.py")
    cmd = [PY, main, yaml, "modle.size=17m"]
    if entry == "composer":
        cmd = [
            COMPOSER,
            "-n",
            "1",
            "--master_port",
            str(free_port()),
            main,
            yaml,
            "modle.size=17m",
        ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, cwd=world)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, _out(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ettin train: error:")]
    assert len(lines) == 1 and "unknown config key 'modle'; did you mean 'model'?" in lines[0]
    if entry == "python":
        assert proc.stderr.strip() == lines[0] and proc.returncode == 2


def test_debug_shows_the_traceback(monkeypatch):
    from ettin.config import ConfigError
    from ettin.train import main

    args = [str(ROOT / "yamls/tiny/encoder.yaml"), "modle.size=17m"]
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        main([*args, "--debug"])
    monkeypatch.setenv("ETTIN_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(args)


def test_data_error_at_the_entry_point_is_one_line(world, capsys):
    from ettin.train import main

    args = _overrides(world, "nodata", "mlm", f"data.path={world / 'nowhere'}")
    with pytest.raises(SystemExit) as exit_info:
        main([str(ROOT / "yamls/tiny/encoder.yaml"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("ettin train: error: split folder") and err.count("\n") == 1, err


# --------------------------------------------------------------------------- order audit


def test_audit_counts_the_order_inside_a_step_unless_packed(tmp_path, capsys):
    import pyarrow as pa

    from ettin.cli import main
    from ettin.data import build_order, export_order, write_order

    planned = export_order(build_order(120, global_batch_size=8, seed=21, max_seq_len=24), 4)
    ids = planned.column("sample_id").to_numpy().copy()
    ids[8:16] = ids[8:16][::-1]  # step 1: same samples, another order
    run = tmp_path / "run"
    run.mkdir()
    recorded = write_order(planned.set_column(1, "sample_id", pa.array(ids)), run / "rec.parquet")
    plan = write_order(planned, tmp_path / "plan.parquet")
    with pytest.raises(SystemExit) as exit_info:
        main(["order", "audit", str(recorded), str(plan)])
    assert exit_info.value.code == 1
    assert "DIFFERENT at step 1: same samples in another order" in capsys.readouterr().out
    main(["order", "audit", str(recorded), str(plan), "--packed"])
    assert "OK: 4 steps match (same samples" in capsys.readouterr().out
    (run / "config.yaml").write_text("data:\n  packing: true\n")  # the run's own config says so
    main(["order", "audit", str(recorded), str(plan)])
    assert "OK: 4 steps match" in capsys.readouterr().out
