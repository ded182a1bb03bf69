"""One skip contract: `ettin.data.skips` owns `<run_dir>/skip_steps.json`, and `order_for_run` is
the order both training and `ettin order export` use, so the export lists what the run trains on
(also after a loss-spike rewind, which a rerun of the same command picks up); a rewind with the
streaming order is refused when the config is read; overrides go anywhere on the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import random_samples, tiny_config, tiny_tokenizer, write_phase

from ettin.config import ConfigError, load_config
from ettin.data import DataError, build_dataloader, read_order
from ettin.data.skips import SKIP_FILE, add_skip, merge, read_skip_file, run_skips


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def run_file(tmp_path_factory, tok) -> Path:
    """A run file on a 120-sample phase, global batch 8, its run folder `runs/t` beside it."""
    root = tmp_path_factory.mktemp("skips")
    phase = write_phase(
        root / "phase", tok, {"train": random_samples(120, tok, seed=1, max_len=20)}
    )
    tok.save_pretrained(root / "tok")
    path = root / "run.yaml"
    path.write_text(
        f"run_name: t\nrun_dir: {root / 'runs' / 't'}\ntokenizer: {root / 'tok'}\n"
        f"global_train_batch_size: 8\ndata:\n  path: {phase}\n  max_seq_len: 24\n"
    )
    return path


def test_the_skip_file_contract(tmp_path):
    assert merge([[7, 8], [3, 4], [4, 6], [10, 12], [11, 13]]) == ((3, 6), (7, 8), (10, 13))
    assert read_skip_file(tmp_path) == ()  # no file: nothing skipped
    (tmp_path / SKIP_FILE).write_text("[[5, 6]]")  # the plain-list form
    assert run_skips([[1, 2]], tmp_path) == ((1, 2), (5, 6))
    add_skip(tmp_path, 6, 7, {"step": 6})  # touching [5, 6): merged
    add_skip(tmp_path, 9, 10, {"step": 9})
    data = json.loads((tmp_path / SKIP_FILE).read_text())
    assert data == {"skip_steps": [[5, 7], [9, 10]], "events": [{"step": 6}, {"step": 9}]}
    assert read_skip_file(tmp_path) == ((5, 7), (9, 10))
    (tmp_path / SKIP_FILE).write_text('{"skip_steps": [[4, 2]]}')
    with pytest.raises(DataError, match=rf"{SKIP_FILE}: \[4, 2\] is empty"):
        read_skip_file(tmp_path)
    (tmp_path / SKIP_FILE).write_text("{not json")
    with pytest.raises(DataError, match="is not JSON"):
        run_skips([], tmp_path)


def _export(run_file: Path, out: Path, *args: str, steps: int = 6) -> list[list[int]]:
    """`ettin order export RUN --steps N --out OUT [args]`: the sample ids of each run step."""
    from ettin.cli import main

    main(["order", "export", str(run_file), "--steps", str(steps), "--out", str(out), *args])
    table = read_order(out)
    step, ids = table.column("step").to_pylist(), table.column("sample_id").to_pylist()
    return [[i for s, i in zip(step, ids) if s == k] for k in range(steps)]


def test_order_export_lists_what_training_uses_with_the_run_folders_skips(run_file, tok, tmp_path):
    cfg = load_config(run_file)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SKIP_FILE).write_text(json.dumps({"skip_steps": [[2, 4]]}))
    try:
        exported = _export(run_file, tmp_path / "order.parquet")
        spec = build_dataloader(
            cfg.data,
            cfg.objective,
            tok,
            split="train",
            global_batch_size=8,
            rank=0,
            world_size=1,
            seed=5,
            microbatch_size=8,
            run_dir=run_dir,
        )
        trained = [[sid for sid, _ in keys] for keys in spec.dataloader.batch_sampler][:6]
        assert exported == trained
        fresh = f"run_dir={tmp_path / 'fresh'}"  # a run folder without a skip file
        plain = _export(run_file, tmp_path / "plain.parquet", fresh, steps=8)
        assert exported == plain[:2] + plain[4:]  # order steps 2 and 3 left out
    finally:
        (run_dir / SKIP_FILE).unlink()


def test_order_export_takes_overrides_after_its_options(run_file, tmp_path):
    before = _export(run_file, tmp_path / "a.parquet", "data.shuffle_seed=3")
    from ettin.cli import main

    out = tmp_path / "b.parquet"
    main(
        ["order", "export", str(run_file), "data.shuffle_seed=3", "--steps", "6", "--out", str(out)]
    )
    table = read_order(out)
    assert before[0] == table.column("sample_id").to_pylist()[:8]
    assert before != _export(run_file, tmp_path / "c.parquet")  # the override was applied
    with pytest.raises(SystemExit):  # anything else is still refused
        main(["order", "export", str(run_file), "--steps", "6", "--out", str(out), "--nope"])


def test_rewind_with_the_streaming_order_is_refused_when_the_config_is_read(world):
    streaming = ("data.order=streaming", "callbacks.loss_spike_window=4")
    with pytest.raises(ConfigError) as err:
        tiny_config(world, "s", "mlm", *streaming, "callbacks.loss_spike_action=rewind")
    assert "callbacks.loss_spike_action=rewind" in str(err.value)
    assert "data.order=streaming" in str(err.value)
    tiny_config(world, "s", "mlm", *streaming, "callbacks.loss_spike_action=stop")  # fine


def test_a_rewind_then_the_same_command_trains_the_order_export_lists(world, monkeypatch, capsys):
    """A real rewind at step 4: the rerun (same config, nothing added) resumes from the batch-4
    checkpoint without order step 4, and `ettin order export` of the run's config lists exactly
    the order recorded by the run (audit OK, by order step and by run step)."""
    from ettin.callbacks.loss_spike import LossSpikeError
    from ettin.cli import main
    from ettin.composer_model import EttinComposerModel
    from ettin.train import train

    calls = {"n": 0}
    loss = EttinComposerModel.loss

    def spiky(self, outputs, batch):
        calls["n"] += 1
        value = loss(self, outputs, batch)
        return value * 50 if calls["n"] == 5 else value  # run step 4 (1 microbatch per step)

    monkeypatch.setattr(EttinComposerModel, "loss", spiky)
    cfg = tiny_config(
        world,
        "rewind",
        "clm",
        "max_duration=8ba",
        "save_interval=2ba",
        "device_train_microbatch_size=8",
        "callbacks.export_hf=false",
        "callbacks.loss_spike_window=2",
        "callbacks.loss_spike_action=rewind",
    )
    run_dir = Path(cfg.run_dir)
    with pytest.raises(LossSpikeError, match="Rerun the same command") as err:
        train(cfg)
    assert "data.skip_steps" not in str(err.value)
    assert json.loads((run_dir / SKIP_FILE).read_text())["skip_steps"] == [[4, 5]]
    train(cfg)  # the same command again
    assert (run_dir / "DONE").exists()
    plan = run_dir.parent / "rewind-plan.parquet"
    main(["order", "export", str(run_dir / "config.yaml"), "--steps", "8", "--out", str(plan)])
    assert "skipped order steps [[4, 5]]" in capsys.readouterr().out
    recorded, planned = read_order(run_dir / "data_order.parquet"), read_order(plan)
    assert sorted(set(recorded.column("order_step").to_pylist())) == [0, 1, 2, 3, 5, 6, 7, 8]
    for column in ("step", "order_step", "sample_id"):
        assert recorded.column(column).to_pylist() == planned.column(column).to_pylist(), column
    main(["order", "audit", str(run_dir / "data_order.parquet"), str(plan)])
    assert "OK: 8 steps match" in capsys.readouterr().out
