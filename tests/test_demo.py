"""`make demo` end to end with its smallest settings (slow: run with `make test-slow`)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from ettin.demo import STAGES, run_demo


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    out = run_demo(tmp_path / "demo", tmp_path / "data", quick=True)
    summary = (out / "summary.md").read_text()
    for name in STAGES:
        assert f"| {name} |" in summary
        assert (out / "models" / name / "config.json").exists()
        assert (out / name / "DONE").exists()
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert any((out / "data_order.parquet").iterdir())
    baselines = json.loads((out / "baselines.json").read_text())
    assert 0 < baselines["majority_token_accuracy"] < 0.2
    assert 50 < baselines["unigram_perplexity"] < 5000
    with open(out / "eval" / "results.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(STAGES)
    assert math.isfinite(float(rows["demo-decoder"]["ppl"]))
    assert 0.0 <= float(rows["demo-encoder"]["mlm_acc"]) <= 1.0
    # A second run reuses everything: every stage is skipped.
    again = run_demo(tmp_path / "demo", tmp_path / "data", quick=True)
    assert again == out
