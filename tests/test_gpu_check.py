"""`make gpu-check` (`ettin_gpu.check`, judged by `ettin_gpu.verdict`): what a CPU can reach.

The script proves the GPU path on a lent GPU; here its plan and budgets, its batches, its
backend comparison, its report and, above all, its verdict run on the CPU, so it cannot rot
between GPU sessions: every criterion is flipped on synthetic results and must fail the check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ettin_gpu import check as gpu_check
from ettin_gpu import verdict

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    """`python -m ettin_gpu ARGS` from the checkout with `PYTHONPATH=src`, as `make gpu-check`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "ettin_gpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_dry_run_prints_the_plan_and_budgets_and_runs_nothing(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path / "r.md"), "--sizes", "150m", "1b")
    assert out.returncode == 0, out.stderr
    from ettin.model.attention import available_backends

    here = available_backends(torch.device("cpu"))  # flex, torch on torch 2.7; torch on 2.11
    assert f"backends: {', '.join(here)}" in out.stdout and here[-1] == "torch"
    assert "throughput: 150m@1024 150m@8192 1b@1024 1b@8192 150m@1024 clm" in out.stdout
    assert f"max_duration={verdict.COMPOSER_STEPS}ba" in out.stdout
    assert verdict.COMPOSER_STEPS > 101  # past the batch where NCCL runs used to stop
    budgets = [line for line in out.stdout.splitlines() if line.startswith("budgets:")]
    assert budgets and all(f"{part} " in budgets[0] for part in verdict.BUDGETS)
    assert verdict.TOTAL_BUDGET_S < 8 * 60
    # the throughput cells of the default plan fit their part's budget
    assert 7 * verdict.THROUGHPUT_CELL_S <= verdict.BUDGETS["throughput"]
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
    assert sum(gpu_check.sequence_lengths(mask)) == int((mask > 0).sum())


def test_backend_check_passes_every_backend_that_trains_here():
    from ettin.model.attention import available_backends

    rows = gpu_check.check_backends("test", torch.device("cpu"), rows=2, context=64)
    assert {r.backend for r in rows} == set(available_backends(torch.device("cpu")))
    assert {(r.objective, r.layout) for r in rows} == {
        (o, layout) for o in ("mlm", "clm") for layout in ("padded", "packed")
    }
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert all(0 < r.bwd_err < r.bwd_limit for r in rows)  # bf16 really ran, and was judged


def _attention_ignoring_masks_in_bf16(monkeypatch) -> None:
    """A torch backend broken in bf16 only: its SDPA calls drop the mask and the causal flag."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def broken(q, k, v, attn_mask=None, is_causal=False, **kw):
        if q.dtype == torch.bfloat16:
            return sdpa(q, k, v)
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)


def test_a_torch_path_broken_in_bf16_fails_its_own_row(monkeypatch):
    """The torch row is judged by a bound it does not set: a decoder whose bf16 attention sees
    the future (its fp32 reference is right) fails, while the bound stays what bf16 costs."""
    from ettin.model.attention import available_backends

    fine = gpu_check.check_backends("test", torch.device("cpu"), rows=2, context=64)
    _attention_ignoring_masks_in_bf16(monkeypatch)
    rows = gpu_check.check_backends("test", torch.device("cpu"), rows=2, context=64)
    broken = {(r.objective, r.layout) for r in rows if r.backend == "torch" and not r.ok}
    assert broken == {("clm", "padded"), ("clm", "packed")}, rows
    assert [(r.fwd_limit, r.bwd_limit) for r in rows] == [(r.fwd_limit, r.bwd_limit) for r in fine]
    if "flex" in available_backends(torch.device("cpu")):  # no SDPA: right, and judged right
        assert all(r.ok for r in rows if r.backend == "flex")
    r = verdict.Results("x", parts=["backends"], backends=rows, done=["backends"])
    assert any(f.startswith("backends: torch clm") for f in verdict.failures(r))


def test_the_bf16_emulation_rounds_every_matmul_and_restores_the_model():
    model = gpu_check.build_model("test", "mlm", torch.device("cpu"))
    x = torch.randn(3, model.args.hidden_size)
    dense = model.head.dense
    with gpu_check.bf16_rounding(model):
        got = dense(x)
    want = (x.bfloat16().float() @ dense.weight.bfloat16().float().T).bfloat16().float()
    assert torch.equal(got, want) and not torch.equal(dense(x), got)
    assert verdict.backend_limit(1e-3) == verdict.BF16_FACTOR * 1e-3 + verdict.BF16_FLOOR


def test_throughput_cell_times_stableadamw_on_pregenerated_batches():
    row = gpu_check.check_throughput("test", 128, "mlm", torch.device("cpu"), 1, 2, False)
    assert row.optimizer == "StableAdamW" and row.steps == 2 and row.tok_s > 0
    assert row.loss_compiled == row.loss_eager  # batch 0, same weights (eager here)
    r = verdict.Results("x", parts=["throughput"], throughput=[row], done=["throughput"])
    assert verdict.failures(r) == []


def test_losses_skip_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"batch": 0, "loss/train/total": 2.5}\n{"batch": 1, "loss/train/to')
    assert gpu_check.losses(path) == {0: 2.5}


# ----------------------------------------------------------------------------- the verdict


def passing() -> verdict.Results:
    steps = list(range(verdict.COMPOSER_SAVE, verdict.COMPOSER_STEPS))
    return verdict.Results(
        "Device: x",
        parts=list(gpu_check.PARTS),
        backends=[verdict.BackendRow("mlm", "packed", "flex", 1e-3, 2e-3, 1e-2, 1e-2, 0.5)],
        throughput=[
            verdict.ThroughputRow(
                "150m",
                1024,
                "mlm",
                "flex",
                "per block",
                "StableAdamW",
                4,
                1e5,
                0.1,
                0.2,
                10.0,
                3,
                3,
                10.4,
                10.41,
                9.8,
            )  # fmt: skip
        ],
        composer=verdict.ComposerResult(verdict.COMPOSER_STEPS, 62, steps, 0.0, 10.8, 7.1, 30.0),
        done=list(gpu_check.PARTS),
    )


def _replace(r: verdict.Results, part: str, **changes) -> verdict.Results:
    if part == "composer":
        return dataclasses.replace(r, composer=dataclasses.replace(r.composer, **changes))
    rows = [dataclasses.replace(getattr(r, part)[0], **changes)]
    return dataclasses.replace(r, **{part: rows})


FLIPS = {
    "backend error > bound": ("backends", {"fwd_err": 0.5}),
    "backend gradient error > bound": ("backends", {"bwd_err": 0.5}),
    "graphs grow": ("throughput", {"graphs_after_timing": 4}),
    "out of memory": ("throughput", {"error": "out of memory"}),
    "optimizer fell back": ("throughput", {"optimizer": "AdamW"}),
    "nothing timed": ("throughput", {"steps": 0}),
    "compiled loss differs": ("throughput", {"loss_compiled": 11.0}),
    "loss is NaN": ("throughput", {"loss_last": math.nan}),
    "resume diff > bound": ("composer", {"max_abs_loss_diff": 1e-3}),
    "resume diff missing": ("composer", {"max_abs_loss_diff": math.nan}),
    "resumed steps missing": ("composer", {"resumed_steps": list(range(60, 129))}),
    "rerun started afresh": ("composer", {"resumed_steps": list(range(130))}),
    "killed_at missing": ("composer", {"killed_at": None}),
    "killed after the end": ("composer", {"killed_at": 130}),
    "killed before the checkpoint": ("composer", {"killed_at": 50}),
    "129 of 130 steps": ("composer", {"steps": 129}),
    "loss did not fall": ("composer", {"last_loss": 11.0}),
    "composer error": ("composer", {"error": "exit 1"}),
}


def test_the_passing_results_pass():
    assert verdict.failures(passing()) == []
    assert verdict.report(passing()).endswith("- verdict: PASS")


@pytest.mark.parametrize("flip", list(FLIPS))
def test_each_criterion_fails_the_check(flip):
    part, changes = FLIPS[flip]
    fails = verdict.failures(_replace(passing(), part, **changes))
    assert len(fails) >= 1 and all(f.split()[0].startswith(part[:7]) for f in fails), fails
    assert verdict.report(_replace(passing(), part, **changes)).endswith("- verdict: FAIL")


@pytest.mark.parametrize("kind", ["errors", "skipped"])
def test_part_errors_and_skips_fail_the_check(kind):
    r = passing()
    if kind == "errors":
        r.errors["backends"] = "NotImplementedError: no flex backward"
    else:
        r.skipped.append("throughput 1b@8192 mlm (12 s left)")
    assert len(verdict.failures(r)) == 1


def test_report_is_markdown_written_after_each_part(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    r = passing()
    r.done = ["backends"]
    verdict.write(r, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert (
        "| mlm | packed | flex | 1.00e-03 |" in text and "not run yet: throughput, composer" in text
    )
    assert "verdict" not in text  # not judged before the end
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["backends"][0]["backend"] == "flex" and data["done"] == ["backends"]
    assert (tmp_path / "out/gpu_check.md").read_text() == text


def test_main_exit_code_follows_the_verdict(tmp_path, monkeypatch):
    """A smoke run of the backends part alone: exit 0 when its rows pass, 1 when one fails."""
    monkeypatch.setattr(gpu_check, "bundle_env", lambda bundle, work: {})
    for err, code in ((1e-3, 0), (0.5, 1)):
        row = verdict.BackendRow("mlm", "packed", "flex", err, 1e-3, 1e-2, 1e-2, 0.5)
        monkeypatch.setattr(gpu_check, "check_backends", lambda *a, row=row: [row])
        out = tmp_path / f"r{code}.md"
        assert gpu_check.main(["--smoke", "--parts", "backends", "--out", str(out)]) == code
        assert json.loads(out.with_suffix(".json").read_text())["done"] == ["backends"]


def test_clock_skips_what_does_not_fit(monkeypatch):
    clock = gpu_check.Clock(limited=True)
    assert clock.fits("setup", verdict.BUDGETS["setup"] - 1)
    clock.start -= verdict.BUDGETS["setup"] + verdict.BUDGETS["backends"]  # both used up
    assert not clock.fits("backends", 1)
    assert clock.fits("throughput", verdict.THROUGHPUT_CELL_S)
    assert not gpu_check.Clock(limited=True).fits("composer", verdict.TOTAL_BUDGET_S + 1)
    assert gpu_check.Clock(limited=False).fits("composer", 1e9)  # --smoke: no budget


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path):
    out = _run("--smoke", "--parts", "backends", "throughput", "--out", str(tmp_path / "r.md"))
    assert out.returncode == 0, out.stdout + out.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| test | 256 | mlm | torch |" in text and "| test | 256 | clm | torch |" in text


# As the Makefile picks it: $STANDIN_PY, else pyenv's 3.12, else python3.12 on the PATH.
STANDIN_PY = os.environ.get("STANDIN_PY") or next(
    (str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))),
    shutil.which("python3.12") or "python3.12",
)


@pytest.mark.slow
@pytest.mark.skipif(
    subprocess.run([STANDIN_PY, "-V"], capture_output=True).returncode != 0
    if shutil.which(STANDIN_PY)
    else True,
    reason=f"needs a working python3.12 (STANDIN_PY={STANDIN_PY})",
)
def test_gpu_standin():
    """`make gpu-standin`: the wheelhouse installs on a Python 3.12 + torch 2.11 stand-in of the
    GPU machine, the smoke run passes, StableAdamW is optimi's, and the kill -9 run resumes."""
    out = subprocess.run(
        ["make", "gpu-standin", f"STANDIN_PY={STANDIN_PY}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    r = json.loads((ROOT / "runs/standin/gpu_check.json").read_text())
    assert "python 3.12" in r["environment"] and "torch 2.11" in r["environment"]
    assert r["errors"] == {} and r["skipped"] == [] and r["done"] == list(gpu_check.PARTS)
    assert {t["optimizer"] for t in r["throughput"]} == {"StableAdamW"}
    c = r["composer"]
    wanted = list(range(verdict.COMPOSER_SAVE, verdict.COMPOSER_STEPS))
    assert c["resumed_steps"] == wanted and c["max_abs_loss_diff"] <= verdict.RESUME_TOL
