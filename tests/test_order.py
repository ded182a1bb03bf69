"""The global data order: ranks, warm-up, resumption, replay, audit, recording (ettin.data.order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, random_samples, tiny_composer_model, tiny_tokenizer, write_phase

from ettin.config import DataConfig, ObjectiveConfig
from ettin.data import (
    BatchSchedule,
    DataOrder,
    audit,
    build_dataloader,
    build_order,
    export_order,
    permutation,
    rank_slice,
    read_order,
    write_order,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def phase(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("phase")
    return write_phase(root, tok, {"train": random_samples(120, tok, seed=1, max_len=20)})


# --------------------------------------------------------------------------- pure functions


def test_permutation_is_the_reference_rule():
    ref = np.random.Generator(np.random.PCG64DXSM(21 + 3)).permutation(1000)
    assert np.array_equal(permutation(1000, 21, 3), ref)


def test_global_batches_are_contiguous_blocks_and_epochs_differ():
    order = build_order(1000, global_batch_size=96, seed=21, max_seq_len=128)
    assert order.steps_in_epoch(0) == order.steps_in_epoch(1) == 1000 // 96
    perm = permutation(1000, 21, 1)
    for k in (0, 5, 9):
        assert np.array_equal(order.global_batch(k, 1), perm[k * 96 : (k + 1) * 96])
    assert not np.array_equal(order.global_batch(0, 0), order.global_batch(0, 1))
    assert order.locate(order.epoch_start_step(1) + 2) == (1, 2)
    with pytest.raises(IndexError):
        order.global_batch(10, 0)  # the last partial block is dropped


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_rank_slices_rebuild_the_global_batch(world):
    batch = np.arange(96) * 7
    parts = [rank_slice(batch, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), batch)
    if 96 % world == 0:
        assert {len(p) for p in parts} == {96 // world}


def test_samplers_of_two_ranks_equal_one_rank(phase, tok):
    def batches(rank, world, epoch):
        spec = _spec(phase, tok, rank=rank, world=world, warmup=True)
        spec.dataloader.batch_sampler.set_epoch(epoch)
        return [[sid for sid, _ in keys] for keys in spec.dataloader.batch_sampler]

    for epoch in (0, 1):
        one = batches(0, 1, epoch)
        two = [a + b for a, b in zip(batches(0, 2, epoch), batches(1, 2, epoch))]
        assert one == two and len(one) > 10


# --------------------------------------------------------------------------- warm-up


def test_warmup_grows_to_full_size():
    sched = BatchSchedule.from_config(
        4608, warmup_tokens="50_000_000_000tok", warmup_min=288, max_seq_len=1024
    )
    sizes = sched.sizes(0, sched.warmup_steps + 3)
    assert sizes[0] == 288 and sizes[-1] == 4608 and (np.diff(sizes) >= 0).all()
    assert set(sizes.tolist()) == set(range(288, 4608 + 1, 288))  # every multiple of the minimum
    assert sched.start(sched.warmup_steps) >= 50_000_000_000 // 1024
    # each size lasts a token span proportional to itself: about the same number of steps per size
    counts = np.unique(sizes[: sched.warmup_steps], return_counts=True)[1]
    assert counts.max() - counts.min() <= 1
    assert sched.start(sched.warmup_steps + 2) == sched.start(sched.warmup_steps) + 2 * 4608


def test_warmup_same_for_mlm_and_clm(phase, tok):
    sizes = {}
    for objective in ("mlm", "clm"):
        spec = _spec(phase, tok, objective=objective, warmup=True)
        sizes[objective] = [len(keys) for keys in spec.dataloader.batch_sampler]
    assert sizes["mlm"] == sizes["clm"]
    assert sizes["mlm"][0] == 4 and sizes["mlm"][-1] == 8


def test_warmup_min_must_suit_world_and_batch(phase, tok):
    with pytest.raises(ValueError, match="must divide the global batch"):
        BatchSchedule.from_config(10, warmup_tokens="100tok", warmup_min=4, max_seq_len=8)
    with pytest.raises(ValueError, match="multiple of the 4 ranks"):
        _spec(phase, tok, world=4, warmup=True, warmup_min=2)


# --------------------------------------------------------------------------- resumption


def test_sampler_started_at_step_k_continues_the_uninterrupted_run(phase, tok):
    full = list(_spec(phase, tok, warmup=True).dataloader.batch_sampler)
    for k in (1, 7, 12, len(full) - 1):
        spec = _spec(phase, tok, warmup=True)
        spec.dataloader.batch_sampler.start_at(k)
        assert list(spec.dataloader.batch_sampler) == full[k:]


def test_checkpoint_state_round_trip(phase, tok):
    """Composer's dataset state hook: sample_in_epoch -> the step to start at, across warm-up."""
    spec = _spec(phase, tok, warmup=True)
    sampler = spec.dataloader.batch_sampler
    sampler.set_epoch(1)
    full = list(sampler)
    order = sampler.order
    t0 = order.epoch_start_step(1)
    for k in (0, 3, 9):
        consumed = order.schedule.start(t0 + k) - order.schedule.start(t0)
        state = spec.dataloader.dataset.state_dict(consumed, True)
        fresh = _spec(phase, tok, warmup=True)
        fresh.dataloader.dataset.load_state_dict(state)
        fresh.dataloader.batch_sampler.set_epoch(1)
        assert list(fresh.dataloader.batch_sampler) == full[k:]
    with pytest.raises(ValueError, match="not a step boundary"):
        fresh.dataloader.dataset.load_state_dict({**state, "sample_in_epoch": 5})
    with pytest.raises(ValueError, match="different data order"):
        fresh.dataloader.dataset.load_state_dict({**state, "seed": 22})


def test_composer_resume_matches_uninterrupted(phase, tok, tmp_path):
    """A real Composer run (packing, CLM, warm-up) stopped at step 4 and resumed to step 27 (into
    epoch 1) records exactly what an uninterrupted run records, which is the planned order."""
    import torch
    from composer import Trainer

    from ettin.callbacks.data_order import DataOrderRecorder

    def run(folder, duration, load_path=None):
        model = tiny_composer_model(len(tok))
        trainer = Trainer(
            model=model,
            train_dataloader=_spec(phase, tok, objective="clm", warmup=True, packing=True),
            max_duration=duration,
            optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
            device="cpu",
            device_train_microbatch_size=2,
            accumulate_train_batch_on_tokens=True,
            save_folder=str(folder / "ckpt"),
            save_filename="ba{batch}.pt",
            save_interval="4ba",
            save_overwrite=True,
            load_path=load_path,
            callbacks=[DataOrderRecorder(folder / "recorded")],
            progress_bar=False,
            log_to_console=False,
            spin_dataloaders=False,
        )
        trainer.fit()
        trainer.close()
        return read_order(folder / "recorded")

    straight = run(tmp_path / "straight", "27ba")
    run(tmp_path / "resumed", "6ba")  # records steps 0-5, checkpoints at step 4
    resumed = run(
        tmp_path / "resumed", "27ba", load_path=str(tmp_path / "resumed" / "ckpt" / "ba4.pt")
    )
    assert resumed.to_pydict() == straight.to_pydict()  # steps 4-5 re-recorded once, not twice
    planned = export_order(_spec(phase, tok, warmup=True).dataloader.batch_sampler.order, 27)
    report = audit(resumed, planned, ordered=False)  # packed: a step's samples, in packing order
    assert report.ok and report.steps_compared == 27, str(report)


# --------------------------------------------------------------------------- replay / audit


def test_export_then_replay_gives_the_same_batches(phase, tok, tmp_path):
    order = _spec(phase, tok, warmup=True).dataloader.batch_sampler.order
    table = export_order(order, 30)  # crosses into epoch 1
    path = write_order(table, tmp_path / "order.parquet")
    spec = _spec(phase, tok, order_file=str(path))
    replay = spec.dataloader.batch_sampler
    assert len(replay) == 30
    planned = [(order.global_batch(k, e), e) for _, e, k in order.iter_steps(0, 30)]
    for k, keys in enumerate(replay):
        ids, epoch = planned[k]
        assert [s for s, _ in keys] == ids.tolist()
        assert {e for _, e in keys} == {epoch}  # masks use the recorded epoch
    assert audit(table, read_order(path)).ok


def test_audit_reports_the_first_differing_step(phase, tok):
    order = build_order(120, global_batch_size=8, seed=21, max_seq_len=24)
    planned = export_order(order, 6)
    ids = planned.column("sample_id").to_numpy().copy()
    ids[8 * 4 + 3] = 10_000  # step 4
    import pyarrow as pa

    recorded = planned.set_column(1, "sample_id", pa.array(ids))
    report = audit(recorded, planned)
    assert not report.ok and report.first_differing_step == 4 and "10000" in report.detail
    shuffled = planned.take(np.argsort(-np.arange(planned.num_rows), kind="stable"))
    assert not audit(shuffled, planned).ok  # padded runs: the order inside a step counts
    within = audit(shuffled, planned, ordered=False)  # packed runs: only the set of a step
    assert within.ok and not within.same_order_within_steps


def test_replay_rejects_bad_files(phase, tok, tmp_path):
    import pyarrow as pa

    write_order(
        pa.table({"step": [0, 0, 2, 2], "sample_id": [1, 2, 3, 4]}), tmp_path / "gap.parquet"
    )
    with pytest.raises(ValueError, match="step 1 is missing"):
        _spec(phase, tok, order_file=str(tmp_path / "gap.parquet"))
    write_order(pa.table({"step": [0, 0], "sample_id": [1, 500]}), tmp_path / "range.parquet")
    with pytest.raises(ValueError, match="sample_id 500 is out of range"):
        _spec(phase, tok, order_file=str(tmp_path / "range.parquet"))
    # step + input_ids (the published schema) is the data itself; it must fit the run
    write_order(pa.table({"step": [0], "input_ids": [[1, 2]]}), tmp_path / "noid.parquet")
    with pytest.raises(ValueError, match="step 0 has 1 samples but the run's global batch"):
        _spec(phase, tok, order_file=str(tmp_path / "noid.parquet"))
    write_order(pa.table({"step": [0], "epoch": [0]}), tmp_path / "noid.parquet")
    with pytest.raises(ValueError, match="needs a `step` column and `sample_id`"):
        _spec(phase, tok, order_file=str(tmp_path / "noid.parquet"))


def test_cli_export_replay_audit(phase, tok, tmp_path, capsys):
    from ettin.cli import main

    tok.save_pretrained(tmp_path / "tok")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"run_name: t\ntokenizer: {tmp_path / 'tok'}\nglobal_train_batch_size: 8\n"
        f"data:\n  path: {phase}\n  max_seq_len: 24\n"
    )
    out = tmp_path / "order.parquet"
    main(
        [
            "order",
            "export",
            str(cfg),
            "data.shuffle_seed=3",
            "--steps",
            "5",
            "--out",
            str(out),
            "--with-tokens",
        ]
    )
    table = read_order(out)
    assert (
        table.column_names == ["step", "sample_id", "epoch", "input_ids"] and table.num_rows == 40
    )
    order = build_order(120, global_batch_size=8, seed=3, max_seq_len=24)
    assert table.column("sample_id").to_numpy()[:8].tolist() == order.global_batch(0, 0).tolist()
    main(["order", "replay", str(cfg), "data.shuffle_seed=3", "--order", str(out)])
    text = capsys.readouterr().out
    assert "5 steps" in text and "match the dataset" in text and f"data.order_file={out}" in text
    main(["order", "audit", str(out), str(out)])
    assert "OK: 5 steps match" in capsys.readouterr().out
    other = tmp_path / "other.parquet"
    main(["order", "export", str(cfg), "--steps", "5", "--out", str(other)])
    with pytest.raises(SystemExit) as exit_info:
        main(["order", "audit", str(other), str(out)])
    assert exit_info.value.code == 1 and "DIFFERENT at step 0" in capsys.readouterr().out


# --------------------------------------------------------------------------- two real ranks


def test_two_rank_composer_run_matches_single_process(phase, tmp_path):
    """`composer -n 2`: per-step batches of two ranks, and a resumed 2-rank run's recorded order."""
    import dist_order_check as check  # tests/ is on sys.path (pytest's rootdir rule)

    out = tmp_path / "out"
    out.mkdir()
    composer = Path(sys.executable).with_name("composer")
    cmd = [
        str(composer),
        "-n",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "dist_order_check.py"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*cmd, str(phase), str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "done.json").read_text()) == {"world_size": 2, "batch": 26}

    order = build_order(
        120,
        global_batch_size=check.GLOBAL_BATCH,
        seed=DataConfig(path="x").shuffle_seed,
        max_seq_len=check.SETTINGS["max_seq_len"],
        warmup_tokens=check.SETTINGS["batch_size_warmup_tokens"],
        warmup_min=check.SETTINGS["batch_size_warmup_min"],
    )
    seen = json.loads((out / "batches.json").read_text())
    expected = {
        f"{e}/{k}": order.global_batch(k, e).tolist()
        for e in (0, 1)
        for k in range(order.steps_in_epoch(e))
    }
    assert seen == expected

    recorded = read_order(out / "recorded")
    report = audit(recorded, export_order(order, 26))
    assert report.ok and report.steps_compared == 26 and report.same_order_within_steps, str(report)


# --------------------------------------------------------------------------- helpers


def _spec(phase, tok, *, objective="mlm", rank=0, world=1, warmup=False, warmup_min=4, **data):
    if warmup:
        data.update(batch_size_warmup_tokens=f"{40 * 24}tok", batch_size_warmup_min=warmup_min)
    cfg = DataConfig(path=str(phase), max_seq_len=24, **data)
    return build_dataloader(
        cfg,
        ObjectiveConfig(name=objective),
        tok,
        split="train",
        global_batch_size=8,
        rank=rank,
        world_size=world,
        seed=5,
        microbatch_size=2,
    )


def test_order_rejects_datasets_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DataOrder(5, BatchSchedule(full=8), 21)
