"""End-to-end training on CPU: a tiny model, a learnable synthetic phase, the real Trainer.

Checks what the training issue promises: loss falls and an eval runs for both objectives, the
final model is exported; 2 ranks (gloo) == 1 rank; microbatch 8x1 == 2x4; a run killed at step k
and resumed reproduces the uninterrupted losses exactly; phase transitions load weights only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupted_fit, losses, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run_dir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        out.update({k: v for k, v in json.loads(line).items() if k.startswith("metrics/")})
    return out


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_tiny_run_learns_evaluates_and_exports(world, objective):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from ettin.train import train

    cfg = tiny_config(
        world,
        f"learn-{objective}",
        objective,
        "max_duration=80ba",
        "optim.lr=1e-2",
        "scheduler.t_decay=20ba",
    )
    train(cfg)
    run = Path(cfg.run_dir)
    curve = losses(run)
    first, last = (
        np.mean([curve[k] for k in sorted(curve)[:3]]),
        np.mean([curve[k] for k in sorted(curve)[-3:]]),
    )
    assert last < 0.75 * first, (first, last)
    metrics = _metrics(run)
    assert "metrics/val/CrossEntropy" in metrics
    assert (
        "metrics/val/MaskedAccuracy" if objective == "mlm" else "metrics/val/Perplexity"
    ) in metrics
    assert (run / "DONE").exists()
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    hf = auto.from_pretrained(run / "hf")
    assert hf.config.vocab_size == 72
    assert (run / "data_order.parquet").exists()


def test_microbatching_equals_one_big_batch(world):
    from ettin.train import train

    train(
        tiny_config(
            world,
            "mb8",
            "clm",
            "max_duration=4ba",
            "device_train_microbatch_size=8",
            "callbacks.export_hf=false",
        )
    )
    train(
        tiny_config(
            world,
            "mb2",
            "clm",
            "max_duration=4ba",
            "device_train_microbatch_size=2",
            "callbacks.export_hf=false",
        )
    )
    a, b = losses(world / "runs/mb8"), losses(world / "runs/mb2")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for k in a:
        assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])


def test_resume_after_kill_reproduces_losses(world):
    from ettin.train import train

    common = ("max_duration=10ba", "save_interval=5ba", "callbacks.export_hf=false")
    train(tiny_config(world, "straight", "mlm", *common))

    cfg = tiny_config(world, "killed", "mlm", *common)
    interrupted_fit(cfg, 7)
    assert not (Path(cfg.run_dir) / "DONE").exists()
    train(cfg)  # autoresume from the step-5 checkpoint
    straight, resumed = losses(world / "runs/straight"), losses(world / "runs/killed")
    assert sorted(resumed) == list(range(10))
    for k in range(10):
        assert resumed[k] == straight[k], (k, resumed[k], straight[k])


def test_two_ranks_match_one(world):
    from ettin.train import train

    extra = ("max_duration=6ba", "callbacks.export_hf=false", "eval_interval=100ba")
    train(tiny_config(world, "one-rank", "mlm", *extra))
    overrides = tiny_overrides(world, "two-ranks", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "-m", "ettin.train"]
    cmd += [str(ROOT / "yamls/tiny/encoder.yaml"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = losses(world / "runs/one-rank"), losses(world / "runs/two-ranks")
    assert sorted(one) == sorted(two) == list(range(6))
    for k in one:
        assert abs(one[k] - two[k]) < 1e-5, (k, one[k], two[k])


def test_phase_transition_loads_weights_only(world):
    from ettin.checkpoint import read_checkpoint
    from ettin.train import train

    src = tiny_config(world, "phase1", "mlm", "max_duration=3ba", "callbacks.export_hf=false")
    train(src)
    ckpt = Path(src.run_dir) / "checkpoints" / "latest-rank0.pt"
    weights, info = read_checkpoint(ckpt)
    assert info.objective == "mlm"
    # Cross-objective: the decoder starts from the encoder's weights, with fresh time.
    nxt = tiny_config(world, "phase2", "clm", "max_duration=2ba", f"init_from={ckpt}")
    from ettin.train import build_trainer

    trainer = build_trainer(nxt)
    model = trainer.state.model.model
    assert model.args.causal
    assert torch.equal(
        model.state_dict()["model.layers.1.attn.Wqkv.weight"],
        weights["model.layers.1.attn.Wqkv.weight"],
    )
    assert trainer.state.timestamp.batch.value == 0
    # The lineage the export records (ettin eval reads it to tell cross-objective models apart).
    from ettin.checkpoint import RunInfo

    (run_info,) = [c for c in trainer.state.callbacks if isinstance(c, RunInfo)]
    assert run_info.info.lineage["objectives"] == ["mlm", "clm"]
    (export,) = [c for c in trainer.state.callbacks if type(c).__name__ == "HFExport"]
    assert export.options["objectives"] == ["mlm", "clm"]
    trainer.close()


@pytest.mark.slow
def test_recipe_chain_runs_every_stage_from_its_predecessor(world, capsys):
    """The real 17m recipe, scaled down: 3 phases x 2 objectives + both cross branches."""
    from ettin.recipe import run_recipe

    tiny = [
        "model.size=test",
        f"tokenizer={world / 'tokenizer'}",
        f"data_root={world / 'data'}",
        "system=cpu",
        "global_train_batch_size=8",
        "device_train_microbatch_size=8",
        "global_eval_batch_size=16",
        "eval_subset_num_batches=1",
        "max_duration=6ba",
        "save_interval=6ba",
        "scheduler.t_warmup=1ba",
        "scheduler.t_decay=2ba",
        "data.max_seq_len=48",
        "optim.lr=1e-2",
        "callbacks.export_hf=false",
        "callbacks.record_order=false",
    ]
    runs = world / "chain"
    stages = run_recipe(ROOT / "recipes/ettin-17m.yaml", tiny, runs_root=str(runs))
    assert [s.status for s in stages] == ["done"] * 8
    from ettin.checkpoint import read_checkpoint, state_digest

    final = {
        s.cfg.run_name: Path(s.cfg.run_dir) / "checkpoints" / "latest-rank0.pt" for s in stages
    }
    expected = {
        "encoder-17m-extension": "encoder-17m",
        "encoder-17m-decay": "encoder-17m-extension",
        "decoder-17m-extension": "decoder-17m",
        "decoder-17m-decay": "decoder-17m-extension",
        "encoder-from-decoder-17m": "decoder-17m-decay",
        "decoder-from-encoder-17m": "encoder-17m-decay",
    }
    for s in stages:
        _, info = read_checkpoint(final[s.cfg.run_name])
        assert min(losses(Path(s.cfg.run_dir))) == 0  # time restarts: weights only
        if s.cfg.run_name not in expected:
            assert info.lineage == {"objectives": [s.cfg.objective.name]}  # from scratch
            continue
        # The stage's starting weights are exactly its predecessor's final weights.
        source_weights, source_info = read_checkpoint(final[expected[s.cfg.run_name]])
        assert info.lineage["init_digest"] == state_digest(source_weights), s.cfg.run_name
        assert info.objective == s.cfg.objective.name
    capsys.readouterr()
    again = run_recipe(ROOT / "recipes/ettin-17m.yaml", tiny, runs_root=str(runs))
    out = capsys.readouterr().out
    assert out.count("[skip]") == 8 and "[start]" not in out
    assert [s.status for s in again] == ["done"] * 8
