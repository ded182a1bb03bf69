"""`make gpu-check` (bench/gpu_check.py): the parts that a CPU can reach.

The script proves the GPU path on a lent GPU; here its argument handling, its plan, its batches
and its backend comparison run on the CPU, so it cannot rot between GPU sessions.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench/gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path / "r.md"), "--sizes", "150m", "1b")
    assert out.returncode == 0, out.stderr
    assert "backends: flex, torch" in out.stdout  # flex needs no compiled extension
    assert "throughput: 150m@1024 150m@8192 1b@1024 1b@8192" in out.stdout
    assert f"max_duration={gpu_check.COMPOSER_STEPS}ba" in out.stdout
    assert gpu_check.COMPOSER_STEPS > 101  # past the batch where NCCL runs used to stop
    assert not (tmp_path / "r.md").exists()


def test_argument_errors():
    bad = _run("--dry-run", "--smoke")
    assert bad.returncode == 2 and "not allowed with" in bad.stderr
    if not torch.cuda.is_available():  # CI's machines: a real run needs --smoke or a GPU
        out = _run("--parts", "backends")
        assert out.returncode == 2 and "no CUDA here" in out.stdout


@pytest.mark.parametrize("packed", [True, False])
def test_batches_are_fresh_variable_length_rows(packed):
    rng = np.random.default_rng(0)
    a = gpu_check.make_batch(rng, 4, 256, 1000, "mlm", torch.device("cpu"), packed=packed)
    b = gpu_check.make_batch(rng, 4, 256, 1000, "mlm", torch.device("cpu"), packed=packed)
    mask = a["attention_mask"]
    if packed:
        assert (mask > 0).all()  # rows are full
        assert mask.max() > 1  # several sequences per row
        assert not torch.equal(mask, b["attention_mask"])  # a new layout every microbatch
    else:
        assert mask.max() == 1 and (mask == 0).any()
    labels = a["labels"]
    assert ((labels != -100) <= (mask > 0)).all() and (labels != -100).any()


def test_backend_check_passes_flex_and_torch_on_cpu():
    rows = gpu_check.check_backends("test", torch.device("cpu"), rows=2, context=64)
    assert {r.backend for r in rows} == {"flex", "torch"}
    assert {(r.objective, r.layout) for r in rows} == {
        (o, layout) for o in ("mlm", "clm") for layout in ("padded", "packed")
    }
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert all(0 < r.bwd_err < r.bwd_limit for r in rows)  # bf16 really ran, and was judged


def test_report_is_markdown_for_results():
    row = gpu_check.BackendRow("mlm", "packed", "flex", 1e-3, 2e-3, 1e-2, 1e-2, 0.5)
    text = gpu_check.report("Device: x", [row], [], None, ["note"])
    assert "| mlm | packed | flex | 1.00e-03 |" in text and text.endswith("- note")


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path):
    out = _run("--smoke", "--parts", "backends", "throughput", "--out", str(tmp_path / "r.md"))
    assert out.returncode == 0, out.stdout + out.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| test | 256 | torch |" in text
