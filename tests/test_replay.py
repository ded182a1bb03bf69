"""Training on an order file as it is (the published `step` + `input_ids` schema), skip ranges.

What issue #17 promises: a published order file trains step by step without shards, the
recorded order equals the file, a resume mid-file is exact, a file that does not fit the run is
refused naming the step; `data.skip_steps` / `<run_dir>/skip_steps.json` remove order steps
identically on every rank and across a resume, and the recorder shows them skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import interrupted_fit, losses, random_samples, tiny_tokenizer, write_phase

from ettin.config import DataConfig, ObjectiveConfig, load_config
from ettin.data import build_dataloader, read_order, write_order
from ettin.data.order import SKIP_FILE, BatchSchedule, DataOrder
from ettin.data.replay import export_order

ROOT = Path(__file__).resolve().parents[1]
WORDS = 60
STEPS, BATCH, SEQ = 12, 8, 48


def _published(tok, steps: int = STEPS, batch: int = BATCH, seed: int = 0) -> pa.Table:
    """A file in the published schema: `step`, `input_ids` (uint32 lists of varied lengths;
    most start with [CLS] and end with [SEP], some lack one or the other)."""
    rng = np.random.default_rng(seed)
    step_col, rows = [], []
    for s in range(steps):
        for _ in range(batch):
            n = int(rng.integers(4, SEQ - 2))
            ids = list(rng.integers(0, WORDS, n))
            if rng.random() < 0.85:
                ids = [tok.cls_token_id, *ids]
            if rng.random() < 0.7:
                ids = [*ids, tok.sep_token_id]
            step_col.append(s)
            rows.append(ids)
    return pa.table(
        {"step": pa.array(step_col, pa.int64()), "input_ids": pa.array(rows, pa.list_(pa.uint32()))}
    )


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(num_words=WORDS)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("replay")
    tok.save_pretrained(root / "tokenizer")
    write_order(_published(tok), root / "published.parquet")
    return root


def _cfg(world: Path, run: str, objective: str, *extra: str):
    return load_config(
        ROOT / "yamls/tiny/encoder.yaml",
        [
            f"objective={objective}",
            f"tokenizer={world / 'tokenizer'}",
            f"data_root={world / 'no-shards'}",  # never read: the file is the data
            f"data.order_file={world / 'published.parquet'}",
            "data.eval_split=null",
            f"run_dir={world / 'runs' / run}",
            f"run_name={run}",
            f"data.max_seq_len={SEQ}",
            f"global_train_batch_size={BATCH}",
            "model.attn_out_dropout=0.0",
            "logging.console_interval=100ba",
            "callbacks.export_hf=false",
            *extra,
        ],
    )


def _rules_applied(tok, raw, encoder: bool) -> list[int]:
    from ettin.data.dataset import SampleRules

    rules = SampleRules.from_tokenizer(tok, max_seq_len=SEQ, encoder=encoder)
    return rules.apply(np.asarray(raw)).tolist()


def _originals(batch) -> list[list[int]]:
    """The tokens of a padded batch before masking (labels hold the originals where masked)."""
    import torch

    ids = batch["input_ids"]
    if "labels" in batch:
        ids = torch.where(batch["labels"] != -100, batch["labels"], ids)
    return [r[m > 0].tolist() for r, m in zip(ids, batch["attention_mask"])]


def _spec(tok, objective="mlm", *, rank=0, world=1, batch=BATCH, max_seq_len=SEQ, **data):
    run_dir = data.pop("run_dir", None)
    cfg = DataConfig(path=data.pop("path", "/nonexistent"), max_seq_len=max_seq_len, **data)
    return build_dataloader(
        cfg,
        ObjectiveConfig(name=objective),
        tok,
        split="train",
        global_batch_size=batch,
        rank=rank,
        world_size=world,
        seed=5,
        microbatch_size=2,
        run_dir=run_dir,
    )


# --------------------------------------------------------------------------- published order


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_published_order_trains_exactly_its_batches(world, tok, objective):
    """A tiny Composer run on the file alone: every step's batch is the file's step (tokens after
    the sample rules; MLM originals recovered from the labels), recorded with the row as id."""
    from composer.core import Callback

    from ettin.train import build_trainer

    seen: dict[int, list[list[int]]] = {}

    class Capture(Callback):
        def after_dataloader(self, state, logger):
            seen[int(state.timestamp.batch)] = _originals(state.batch)

    cfg = _cfg(world, f"published-{objective}", objective, "max_duration=6ba")
    trainer = build_trainer(cfg)
    trainer.state.callbacks.append(Capture())
    trainer.fit()
    trainer.close()
    file = read_order(world / "published.parquet")
    tokens = file.column("input_ids").to_pylist()
    for step in range(6):
        want = [
            _rules_applied(tok, tokens[r], objective == "mlm")
            for r in range(8 * step, 8 * step + 8)
        ]
        assert seen[step] == want, step
    recorded = read_order(Path(cfg.run_dir) / "data_order.parquet")
    assert recorded.column("step").to_pylist() == file.column("step").to_pylist()[:48]
    assert recorded.column("sample_id").to_pylist() == list(range(48))  # the row is the id


def test_resume_mid_file_is_exact(world):
    """Killed at step 7, resumed from the step-5 checkpoint: the same losses and recorded order
    as an uninterrupted run over the file."""

    from ettin.train import train

    common = ("max_duration=10ba", "save_interval=5ba")
    train(_cfg(world, "file-straight", "mlm", *common))

    cfg = _cfg(world, "file-killed", "mlm", *common)
    interrupted_fit(cfg, 7)
    train(cfg)
    straight, resumed = losses(world / "runs/file-straight"), losses(world / "runs/file-killed")
    assert sorted(resumed) == list(range(10))
    assert all(resumed[k] == straight[k] for k in range(10)), (straight, resumed)
    a = read_order(world / "runs/file-straight/data_order.parquet")
    b = read_order(world / "runs/file-killed/data_order.parquet")
    assert a.to_pydict() == b.to_pydict()


def test_a_file_that_does_not_fit_the_run_is_refused(tok, tmp_path):
    good = _published(tok, steps=4)

    def refused(table, match, **kw):
        path = write_order(table, tmp_path / "bad.parquet")
        with pytest.raises(ValueError, match=match):
            _spec(tok, order_file=str(path), **kw)

    refused(good, "step 0 has 8 samples but the run's global batch at that step is 4", batch=4)
    short = good.filter(pa.compute.not_equal(pa.array(np.arange(32) == 13), True))
    refused(short, "step 1 has 7 samples")
    ids = good.column("input_ids").to_pylist()
    ids[19] = [tok.cls_token_id] + [1] * 60
    refused(
        good.set_column(1, "input_ids", pa.array(ids)),
        "step 2, row 19 holds 61 tokens, more than data.max_seq_len=48",
    )
    ids = good.column("input_ids").to_pylist()
    ids[26] = [tok.cls_token_id, 5, 999]
    refused(
        good.set_column(1, "input_ids", pa.array(ids)), "step 3, row 26 holds token id 999, outside"
    )
    steps = good.column("step").to_numpy().copy()
    steps[steps >= 2] += 1
    refused(good.set_column(0, "step", pa.array(steps)), r"step 2 is missing")
    refused(good.take(np.arange(32)[::-1].copy()), "row 8 has step 2 after step 3.*sorted by step")
    refused(good.set_column(1, "input_ids", pa.array([["a"]] * 32)), "not a list of integer")


def test_folder_and_remote_url_are_read_like_a_file(tok, tmp_path):
    """Parts of a folder are ordered by their first step (not by name); a remote folder
    (here fsspec's memory://) is fetched into data.local_cache and gives the same batches."""
    import fsspec

    table = _published(tok, steps=4)
    local = _spec(tok, "clm", order_file=str(write_order(table, tmp_path / "one.parquet")))
    want = [b["input_ids"].tolist() for b in local.dataloader]
    folder = tmp_path / "parts"
    write_order(table.slice(16), folder / "a.parquet")  # steps 2-3
    write_order(table.slice(0, 16), folder / "b.parquet")  # steps 0-1
    assert [
        b["input_ids"].tolist() for b in _spec(tok, "clm", order_file=str(folder)).dataloader
    ] == want
    fs = fsspec.filesystem("memory")
    for name in ("a.parquet", "b.parquet"):
        fs.pipe(f"/published/order/{name}", (folder / name).read_bytes())
    remote = _spec(
        tok, "clm", order_file="memory://published/order", local_cache=str(tmp_path / "c")
    )
    assert [b["input_ids"].tolist() for b in remote.dataloader] == want
    with pytest.raises(ValueError, match="set data.local_cache"):
        _spec(tok, "clm", order_file="memory://published/order")


def test_export_format_ettin_round_trips_the_shards(tok, tmp_path, capsys):
    """`ettin order export --format ettin` (also from a recorded order) writes step + input_ids;
    training on it feeds exactly the tokens of the shards-based run, step by step."""
    from ettin.cli import main

    phase = write_phase(
        tmp_path / "phase", tok, {"train": random_samples(120, tok, seed=1, max_len=30)}
    )
    tok.save_pretrained(tmp_path / "tok")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"run_name: t\ntokenizer: {tmp_path / 'tok'}\nglobal_train_batch_size: 8\n"
        f"data:\n  path: {phase}\n  max_seq_len: 24\n  eval_split: null\n"
    )
    out = tmp_path / "published.parquet"
    main(["order", "export", str(cfg), "--steps", "5", "--out", str(out), "--format", "ettin"])
    assert read_order(out).column_names == ["step", "input_ids"]
    # the run file trains an encoder (the default objective): compare the unmasked tokens
    shards = _spec(tok, path=str(phase), max_seq_len=24)
    from_file = _spec(tok, order_file=str(out), max_seq_len=24)
    pairs = list(zip(range(5), shards.dataloader, from_file.dataloader))
    assert len(pairs) == 5
    for _, a, b in pairs:
        assert _originals(a) == _originals(b)
    # a recorded / exported sample-id order converts without --steps (all of its steps)
    ids = tmp_path / "ids.parquet"
    main(["order", "export", str(cfg), "--steps", "3", "--out", str(ids)])
    again = tmp_path / "again.parquet"
    main(
        [
            "order",
            "export",
            str(cfg),
            f"data.order_file={ids}",
            "--out",
            str(again),
            "--format",
            "ettin",
        ]
    )
    assert read_order(again).to_pydict() == read_order(out).slice(0, 24).to_pydict()
    main(["order", "replay", str(cfg), "--order", str(out)])
    assert "the file holds the tokens" in capsys.readouterr().out


# --------------------------------------------------------------------------- skip ranges


def test_skip_ranges_remove_steps_identically_on_every_rank():
    order = DataOrder(200, BatchSchedule(full=8), 21)
    skipped = DataOrder(200, BatchSchedule(full=8), 21, skip=[[7, 9], [2, 4], [3, 5]])
    assert skipped.skip_ranges == ((2, 5), (7, 9))  # merged, sorted
    kept = [s for s, _, _ in skipped.iter_steps(0, 30)]
    assert kept[:6] == [0, 1, 5, 6, 9, 10] and not {2, 3, 4, 7, 8} & set(kept)
    for step, epoch, k in skipped.iter_steps(0, 30):
        assert np.array_equal(
            skipped.global_batch(k, epoch), order.global_batch(*order.locate(step)[::-1])
        )
    with pytest.raises(ValueError, match=r"\[5, 5\] is empty"):
        DataOrder(200, BatchSchedule(full=8), 21, skip=[[5, 5]])
    with pytest.raises(ValueError, match="removes every step of epoch 0"):
        DataOrder(200, BatchSchedule(full=8), 21, skip=[[0, 25]]).kept(0)


def test_skip_ranges_samplers_ranks_and_resume(tmp_path, tok):
    """1 vs 2 ranks give the same kept batches; a checkpoint's state resumes exactly across a
    skip, and a range added at the checkpoint's next step (a rewind) is honoured."""
    phase = write_phase(
        tmp_path / "phase", tok, {"train": random_samples(120, tok, seed=1, max_len=20)}
    )

    def spec(rank=0, world=1, skip=((3, 5), (9, 10)), run_dir=None):
        return _spec(tok, path=str(phase), max_seq_len=24, rank=rank, world=world,
                     skip_steps=[list(r) for r in skip], run_dir=run_dir)  # fmt: skip

    def sids(s):
        return [[sid for sid, _ in keys] for keys in s.dataloader.batch_sampler]

    one = sids(spec())
    two = [a + b for a, b in zip(sids(spec(0, 2)), sids(spec(1, 2)))]
    assert one == two and len(one) == 15 - 3
    plan = sids(spec(skip=()))
    assert one == plan[:3] + plan[5:9] + plan[10:]
    # resume after the skip: Composer's sample_in_epoch -> the same remaining batches
    s = spec()
    state = s.dataloader.dataset.state_dict(8 * 5, True)  # 5 kept steps done: next is order step 7
    assert state["next_step"] == 7
    fresh = spec()
    fresh.dataloader.dataset.load_state_dict(state)
    assert sids(fresh) == one[5:]
    # a rewind: skip_steps.json adds [7, 9) at the checkpoint's next step
    run = tmp_path / "run"
    run.mkdir()
    (run / SKIP_FILE).write_text(json.dumps([[7, 9]]))
    rewound = spec(run_dir=run)
    assert rewound.dataloader.batch_sampler.order.skip_ranges == ((3, 5), (7, 10))
    rewound.dataloader.dataset.load_state_dict(state)
    assert sids(rewound) == plan[10:]
    (run / SKIP_FILE).write_text(json.dumps([[1, 2]]))  # before the checkpoint: refused
    with pytest.raises(ValueError, match="may only start at or after 7"):
        spec(run_dir=run).dataloader.dataset.load_state_dict(state)


def test_rewind_with_skip_file_resumes_like_a_run_that_skipped(world):
    """A run killed at step 7 whose run folder then gets skip_steps.json [[5, 8]] resumes from
    its step-5 checkpoint on order step 8: the same losses and recorded order as a run with
    data.skip_steps=[[5,8]] from the start. The recorder shows the skip."""

    from ettin.train import train

    common = ("max_duration=9ba", "save_interval=5ba")
    train(_cfg(world, "skip-straight", "clm", *common, "data.skip_steps=[[5,8]]"))

    cfg = _cfg(world, "skip-rewind", "clm", *common)
    interrupted_fit(cfg, 7, "loss spike: rewind")
    (Path(cfg.run_dir) / SKIP_FILE).write_text(json.dumps([[5, 8]]))
    train(cfg)
    straight, rewound = losses(world / "runs/skip-straight"), losses(world / "runs/skip-rewind")
    assert sorted(rewound) == list(range(9))
    assert all(rewound[k] == straight[k] for k in range(9)), (straight, rewound)
    a = read_order(world / "runs/skip-straight/data_order.parquet")
    b = read_order(world / "runs/skip-rewind/data_order.parquet")
    assert a.column("order_step").to_pylist() == b.column("order_step").to_pylist()
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    steps = sorted(set(a.column("order_step").to_pylist()))
    assert steps == [0, 1, 2, 3, 4, 8, 9, 10, 11]  # 5, 6, 7 never trained
    assert sorted(set(a.column("step").to_pylist())) == list(range(9))  # the run's own steps
    sidecar = json.loads(
        (world / "runs/skip-rewind/data_order.parquet/skipped_steps.json").read_text()
    )
    assert sidecar == {"skip_steps": [[5, 8]]}
    # the recorded order equals the plan with the skip (audit by order step)
    from ettin.data.replay import Replay, audit

    plan = export_order(
        DataOrder(96, BatchSchedule(full=8), 21, replay=Replay.open(world / "published.parquet")),
        12,
    )
    report = audit(b, plan)
    assert report.ok and report.steps_compared == 9, str(report)


# --------------------------------------------------------------------------- the published tree


def _tree_cfg(world: Path, run: str, order_file: str, *extra: str):
    """A CLM run (no masking: the batches are the rows) on an order tree alone."""
    return load_config(
        ROOT / "yamls/tiny/encoder.yaml",
        [
            "objective=clm",
            f"tokenizer={world / 'tokenizer'}",
            f"data_root={world / 'no-shards'}",
            f"data.order_file={order_file}",
            "data.eval_split=null",
            f"run_dir={world / 'runs' / run}",
            f"run_name={run}",
            f"data.max_seq_len={SEQ}",
            f"global_train_batch_size={BATCH}",
            "logging.console_interval=100ba",
            "callbacks.export_hf=false",
            *extra,
        ],
    )


def trained_rows(cfg) -> list[tuple[int, ...]]:
    """Every row the run's batches held, in training order (a CLM batch is the rows, padded)."""
    from composer.core import Callback

    from ettin.train import build_trainer

    seen: list[tuple[int, ...]] = []

    class Capture(Callback):
        def after_dataloader(self, state, logger):
            ids, mask = state.batch["input_ids"], state.batch["attention_mask"]
            seen.extend(tuple(r[m > 0].tolist()) for r, m in zip(ids, mask))

    trainer = build_trainer(cfg)
    trainer.state.callbacks.append(Capture())
    trainer.fit()
    trainer.close()
    return seen


def assert_each_once(seen: list[tuple[int, ...]], rows: list[list[int]]) -> None:
    from collections import Counter

    counts = Counter(seen)
    want = Counter(tuple(r) for r in rows)
    assert set(counts.values()) == {1}, "some rows were trained more than once"
    assert counts == want, (
        f"{len(want - counts)} rows of the phase never trained, {len(counts - want)} foreign rows"
    )
    assert seen == [tuple(r) for r in rows], "rows out of (folder, step) order"


def test_order_tree_of_two_folders_trains_every_row_once(world, tok, tmp_path):
    """The published layout (issue #22): a root of two folders of one phase, each with
    `steps_000001_to_000002.parquet`, ... and steps restarting at 1. Every row trains exactly
    once, folder by folder, step by step (before: 'folder holds no .parquet parts')."""
    from helpers import write_order_tree

    root = tmp_path / "ettin-data-order"
    rows = write_order_tree(
        root, tok, {"checkpoint_000000": 4, "checkpoint_000001": 4}, batch=BATCH
    )
    cfg = _tree_cfg(world, "tree-local", str(root), "max_duration=8ba")
    assert_each_once(trained_rows(cfg), rows["checkpoint_000000"] + rows["checkpoint_000001"])


def _epoch_rows(spec) -> list[tuple[int, ...]]:
    return [
        tuple(r[m > 0].tolist())
        for b in spec.dataloader
        for r, m in zip(b["input_ids"], b["attention_mask"])
    ]


def test_order_phase_picks_folders_and_bad_trees_are_refused(tok, tmp_path):
    """data.order_phase (a phase or a glob) selects folders of the whole tree; a root of several
    phases without it, overlapping parts and a phase that matches nothing stop the run naming
    what to fix."""
    from helpers import order_row, write_order_tree

    root = tmp_path / "tree"
    folders = {"checkpoint_000000": 4, "checkpoint_000001": 2, "ext_000000": 2, "decay_000000": 2}
    rows = write_order_tree(root, tok, folders, batch=BATCH)
    with pytest.raises(ValueError, match=r"several phases \(checkpoint, decay, ext\).*order_phase"):
        _spec(tok, "clm", order_file=str(root))
    for phase, names in [
        ("checkpoint", ["checkpoint_000000", "checkpoint_000001"]),
        ("ext", ["ext_000000"]),
        ("checkpoint_*1", ["checkpoint_000001"]),
    ]:
        spec = _spec(tok, "clm", order_file=str(root), order_phase=phase)
        assert_each_once(_epoch_rows(spec), [r for n in names for r in rows[n]])
    spec = _spec(tok, "clm", order_file=str(root / "decay_000000"))  # one phase folder
    assert_each_once(_epoch_rows(spec), rows["decay_000000"])
    with pytest.raises(ValueError, match=r"order_phase=pretrain matches none of its folders"):
        _spec(tok, "clm", order_file=str(root), order_phase="pretrain")
    with pytest.raises(ValueError, match=r"order_phase=ext picks folders .* is one file"):
        part = root / "ext_000000" / "steps_000001_to_000002.parquet"
        _spec(tok, "clm", order_file=str(part), order_phase="ext")
    # a part that repeats steps of its folder: both parts named, nothing trained
    extra = pa.table(
        {
            "step": pa.array([2] * BATCH + [3] * BATCH, pa.int64()),
            "input_ids": pa.array(
                [order_row(tok, 9000 + i) for i in range(2 * BATCH)], pa.list_(pa.uint32())
            ),
        }
    )
    write_order(extra, root / "checkpoint_000000" / "steps_000002_to_000003.parquet")
    with pytest.raises(
        ValueError,
        match=r"parts checkpoint_000000/steps_000001_to_000002.parquet \(steps 1-2\) and "
        r"checkpoint_000000/steps_000002_to_000003.parquet \(steps 2-3\) overlap in steps 2-2",
    ):
        _spec(tok, "clm", order_file=str(root), order_phase="checkpoint")


def test_rows_per_step_follow_the_batch_size_warmup(tok, tmp_path):
    """The fit check follows the run's batch-size schedule, warm-up included: a file made with
    the run's warm-up trains step by step; a file without one is refused, step by step."""
    from helpers import order_row

    warm = {"batch_size_warmup_tokens": f"{24 * SEQ}tok", "batch_size_warmup_min": 4}
    schedule = BatchSchedule.from_config(
        BATCH, warmup_tokens=warm["batch_size_warmup_tokens"], warmup_min=4, max_seq_len=SEQ
    )
    sizes = schedule.sizes(0, 8).tolist()
    assert sizes[0] == 4 and sizes[-1] == BATCH  # the schedule does warm up
    rows = [order_row(tok, i) for i in range(sum(sizes))]
    steps = np.repeat(np.arange(len(sizes)), sizes)
    table = pa.table(
        {"step": pa.array(steps, pa.int64()), "input_ids": pa.array(rows, pa.list_(pa.uint32()))}
    )
    path = write_order(table, tmp_path / "warm.parquet")
    spec = _spec(tok, "clm", order_file=str(path), **warm)
    assert [len(b["input_ids"]) for b in spec.dataloader] == sizes
    flat = write_order(_published(tok, steps=4), tmp_path / "flat.parquet")
    with pytest.raises(ValueError) as err:
        _spec(tok, "clm", order_file=str(flat), **warm)
    msg = str(err.value)
    assert "steps differ from the run's batch-size schedule (batch-size warm-up from 4" in msg
    assert "step 0 has 8 samples but the run's global batch at that step is 4" in msg
    assert "global_train_batch_size=8 and data.batch_size_warmup_tokens=0tok" in msg


def test_remote_order_tree_keeps_every_part(tok, tmp_path):
    """The tree at an fsspec URL (memory://): both folders' parts are cached under their own
    relative paths, so no part replaces another (before: cached by bare file name, the second
    folder overwrote the first and half the rows were lost without a word)."""
    import fsspec
    from helpers import write_order_tree

    local = tmp_path / "tree"
    rows = write_order_tree(
        local, tok, {"checkpoint_000000": 4, "checkpoint_000001": 2}, batch=BATCH
    )
    fs = fsspec.filesystem("memory")
    for p in local.rglob("*.parquet"):
        fs.pipe(f"/order-tree/{p.relative_to(local).as_posix()}", p.read_bytes())
    spec = _spec(tok, "clm", order_file="memory://order-tree", local_cache=str(tmp_path / "c"))
    assert_each_once(_epoch_rows(spec), rows["checkpoint_000000"] + rows["checkpoint_000001"])


def test_order_phase_needs_an_order_file():
    from ettin.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.order_phase=ext picks folders of data.order_file"):
        DataConfig(path="/x", order_phase="ext")


def test_phase_of_a_part_is_its_own_folder_however_deep():
    """A tree below another folder (e.g. a repo's `data/`) is still split by phase folder, never
    merged across phases; hidden files are skipped."""
    from ettin.data.order_file import select_parts

    rels = [
        "data/checkpoint_000000/steps_000001_to_000100.parquet",
        "data/checkpoint_000100/steps_000001_to_000100.parquet",
        "data/ext_000000/steps_000001_to_000100.parquet",
        "data/.cache/ext_000000/steps_000001_to_000100.parquet",
    ]
    with pytest.raises(ValueError, match=r"several phases \(checkpoint, ext\)"):
        select_parts(rels, None, "tree")
    assert select_parts(rels, "ext", "tree") == [rels[2]]
    assert select_parts(rels, "checkpoint_0001*", "tree") == [rels[1]]
    assert select_parts(rels[:2], None, "tree") == rels[:2]


def test_row_errors_name_the_renumbered_step_and_the_part(tok, tmp_path):
    import pyarrow.parquet as pq
    from helpers import write_order_tree

    root = tmp_path / "tree"
    write_order_tree(root, tok, {"ext_000000": 2, "ext_000001": 2}, batch=BATCH)
    part = root / "ext_000001" / "steps_000001_to_000002.parquet"
    table = pq.read_table(part)
    ids = table.column("input_ids").to_pylist()
    ids[0] = [tok.cls_token_id] + [1] * 60
    pq.write_table(table.set_column(1, "input_ids", pa.array(ids, pa.list_(pa.uint32()))), part)
    with pytest.raises(
        ValueError,
        match=r"step 3, row 16 \(in ext_000001/steps_000001_to_000002.parquet\) holds 61 tokens",
    ):
        _spec(tok, "clm", order_file=str(root))
