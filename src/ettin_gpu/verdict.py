"""What `make gpu-check` (`ettin_gpu.check`) concludes: the time budget of each part, the pass
criterion of each part, and the report (markdown and JSON) written after every part.

`check` measures; this module only judges and writes, so a test can feed it synthetic results
and see each criterion fail (tests/test_gpu_check.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Seconds on an H200, per part; the sum is the whole check's bound (the device's commands may
# run 10 minutes, and the check must leave room to rerun). A throughput cell or the Composer
# part starts only if its budget still fits before its part's deadline (the budgets so far,
# added up); what does not fit is skipped, named in the report, and fails the check.
BUDGETS = {"setup": 15, "backends": 60, "throughput": 252, "composer": 140}
THROUGHPUT_CELL_S = 36  # 7 cells: 150m, 400m, 1b at 1024 and 8192 (MLM), 150m at 1024 (CLM)
TOTAL_BUDGET_S = sum(BUDGETS.values())
LIMIT_S = 8 * 60
assert TOTAL_BUDGET_S < LIMIT_S

COMPOSER_STEPS, COMPOSER_SAVE = 130, 60
RESUME_TOL = 1e-5  # deterministic=true: a resumed run repeats the uninterrupted one
LOSS_TOL = 5e-2  # |compiled - eager| bf16 loss on the same batch (bf16 noise is ~1e-2)
# Backends: a bf16 row's relative error (hidden states; all gradients) against the fp32 reference
# may be BF16_FACTOR times the error that bf16 rounding of every matmul's operands and result
# causes in an fp32 step (`check.bf16_rounding`), plus BF16_FLOOR. That emulation tracks bf16
# autocast to within 10% on the CPU (test size and 150m: fwd 1.04-1.06x, bwd 1.05-1.09x); the
# factor leaves room for what it leaves out (kernels' accumulation order, bf16 inside the
# attention kernels). A decoder whose bf16 attention ignores causality is 185x over in the
# forward (tests/test_gpu_check.py).
BF16_FACTOR = 4.0
BF16_FLOOR = 1e-4
# Reference runs (tok/s/GPU, MFU) at 1024 tokens; their MFU counts every position's head.
REFERENCE = {"150m": (296e3, 0.29), "400m": (146e3, 0.37), "1b": (64e3, 0.40)}


def backend_limit(emulated_err: float) -> float:
    """The bound on a bf16 backend's relative error, from the emulated bf16 step's error."""
    return BF16_FACTOR * emulated_err + BF16_FLOOR


@dataclass
class BackendRow:
    objective: str
    layout: str
    backend: str
    fwd_err: float
    bwd_err: float
    fwd_limit: float
    bwd_limit: float
    step_s: float

    @property
    def ok(self) -> bool:
        return self.fwd_err <= self.fwd_limit and self.bwd_err <= self.bwd_limit


@dataclass
class ThroughputRow:
    size: str
    context: int
    objective: str
    backend: str = "-"
    compiled: str = "no"
    optimizer: str = "-"
    steps: int = 0  # timed optimiser steps
    tok_s: float = 0.0
    mfu_scored: float | None = None  # FLOPs as trained: the head on the scored 30% (MLM)
    mfu_all: float | None = None  # the reference convention: the head on every position
    peak_gib: float | None = None
    graphs_after_warmup: int = 0
    graphs_after_timing: int = 0
    loss_eager: float = math.nan  # first batch, before compile
    loss_compiled: float = math.nan  # the same batch, compiled (same weights)
    loss_last: float = math.nan
    error: str | None = None  # out of memory, an exception


@dataclass
class ComposerResult:
    steps: int = 0  # steps the uninterrupted run logged
    killed_at: int | None = None  # steps logged when SIGKILL hit (None: it was never killed)
    resumed_steps: list[int] = field(default_factory=list)  # steps the rerun logged
    max_abs_loss_diff: float = math.nan
    first_loss: float = math.nan
    last_loss: float = math.nan
    straight_run_s: float = 0.0
    error: str | None = None


@dataclass
class Results:
    environment: str
    parts: list[str]
    budgets: dict[str, float] = field(default_factory=lambda: dict(BUDGETS))
    errors: dict[str, str] = field(default_factory=dict)  # part -> what stopped it
    backends: list[BackendRow] = field(default_factory=list)
    throughput: list[ThroughputRow] = field(default_factory=list)
    composer: ComposerResult | None = None
    skipped: list[str] = field(default_factory=list)  # skipped for time
    notes: list[str] = field(default_factory=list)
    elapsed_s: dict[str, float] = field(default_factory=dict)  # part -> seconds
    done: list[str] = field(default_factory=list)  # parts finished (or failed) so far


def failures(r: Results) -> list[str]:
    """Every failed criterion, one line each; empty when the check passes."""
    out = [f"{part}: {err}" for part, err in r.errors.items()]
    out += [f"skipped for time: {s}" for s in r.skipped]
    if "backends" in r.done and "backends" not in r.errors:
        if not r.backends:
            out.append("backends: nothing was compared")
        for b in r.backends:
            if not b.ok:
                out.append(
                    f"backends: {b.backend} {b.objective} {b.layout}: error fwd {b.fwd_err:.2e} "
                    f"(bound {b.fwd_limit:.2e}), bwd {b.bwd_err:.2e} (bound {b.bwd_limit:.2e})"
                )
    if "throughput" in r.done:
        for t in r.throughput:
            cell = f"throughput {t.size}@{t.context} {t.objective}"
            if t.error:
                out.append(f"{cell}: {t.error}")
                continue
            if t.optimizer != "StableAdamW":
                out.append(f"{cell}: timed {t.optimizer}, not ettin's StableAdamW")
            if t.steps < 1:
                out.append(f"{cell}: no optimiser step was timed")
            if t.graphs_after_timing != t.graphs_after_warmup:
                out.append(
                    f"{cell}: compiled graphs grew while timing "
                    f"({t.graphs_after_warmup} -> {t.graphs_after_timing}): it recompiles"
                )
            losses = (t.loss_eager, t.loss_compiled, t.loss_last)
            if not all(math.isfinite(x) for x in losses):
                out.append(f"{cell}: a loss is not finite {losses}")
            elif abs(t.loss_compiled - t.loss_eager) > LOSS_TOL:
                out.append(
                    f"{cell}: compiled loss {t.loss_compiled:.4f} != eager {t.loss_eager:.4f} "
                    f"(bound {LOSS_TOL})"
                )
    if "composer" in r.done and "composer" not in r.errors:
        c = r.composer
        if c is None or c.error:
            out.append(f"composer: {c.error if c else 'no result'}")
        else:
            out += _composer_failures(c)
    return out


def _composer_failures(c: ComposerResult) -> list[str]:
    out = []
    if c.steps != COMPOSER_STEPS:
        out.append(f"composer: the uninterrupted run logged {c.steps} of {COMPOSER_STEPS} steps")
    if c.killed_at is None or not COMPOSER_SAVE < c.killed_at < COMPOSER_STEPS:
        out.append(
            f"composer: killed_at {c.killed_at}: the second run was not killed between its "
            f"step-{COMPOSER_SAVE} checkpoint and its end"
        )
    wanted = list(range(COMPOSER_SAVE, COMPOSER_STEPS))
    if c.resumed_steps != wanted:
        missing = sorted(set(wanted) - set(c.resumed_steps))
        extra = sorted(set(c.resumed_steps) - set(wanted))
        out.append(
            f"composer: the rerun did not resume at step {COMPOSER_SAVE} and run to the end "
            f"(missing {_span(missing)}, unexpected {_span(extra)})"
        )
    if not c.max_abs_loss_diff <= RESUME_TOL:  # NaN fails too
        out.append(
            f"composer: resumed losses differ from the uninterrupted run's by "
            f"{c.max_abs_loss_diff:.3g} (bound {RESUME_TOL})"
        )
    if not c.last_loss < c.first_loss:
        out.append(f"composer: the loss did not fall ({c.first_loss:.4f} -> {c.last_loss:.4f})")
    return out


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    return str(steps[0]) if len(steps) == 1 else f"{len(steps)} steps, {steps[0]}..{steps[-1]}"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x else "n/a"


def report(r: Results) -> str:
    """The markdown for bench/RESULTS.md: environment, one table per part, the verdict."""
    lines = [r.environment, ""]
    if r.backends:
        lines += [
            f"Backends in bf16 against fp32; bound: {BF16_FACTOR:g}x the error of bf16 rounding "
            f"emulated in fp32, + {BF16_FLOOR:g}.",
            "",
            "| objective | rows | backend | fwd rel. err | bound | bwd rel. err | bound | step ms "
            "| torch time / this | |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        torch_s = {(b.objective, b.layout): b.step_s for b in r.backends if b.backend == "torch"}
        for b in r.backends:
            speed = torch_s.get((b.objective, b.layout), math.nan) / b.step_s
            lines.append(
                f"| {b.objective} | {b.layout} | {b.backend} | {b.fwd_err:.2e} | {b.fwd_limit:.2e} "
                f"| {b.bwd_err:.2e} | {b.bwd_limit:.2e} | {b.step_s * 1e3:.1f} | {speed:.2f}x | "
                f"{'ok' if b.ok else 'FAIL'} |"
            )
        lines.append("")
    if r.throughput:
        lines += [
            "| size | context | objective | backend | compiled | tokens/s | ref. tok/s | MFU "
            "(scored) | MFU (all positions) | ref. MFU (all) | peak GiB | graphs warm -> timed "
            "| loss eager / compiled |",
            "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for t in r.throughput:
            if t.error:
                lines.append(f"| {t.size} | {t.context} | {t.objective} | {t.error} |")
                continue
            ref = REFERENCE.get(t.size) if t.context == 1024 and t.objective == "mlm" else None
            mem = f"{t.peak_gib:.1f}" if t.peak_gib is not None else "n/a"
            lines.append(
                f"| {t.size} | {t.context} | {t.objective} | {t.backend} | {t.compiled} | "
                f"{t.tok_s:,.0f} | {f'{ref[0]:,.0f}' if ref else '-'} | {_pct(t.mfu_scored)} | "
                f"{_pct(t.mfu_all)} | {f'{ref[1]:.0%}' if ref else '-'} | {mem} | "
                f"{t.graphs_after_warmup} -> {t.graphs_after_timing} | "
                f"{t.loss_eager:.4f} / {t.loss_compiled:.4f} |"
            )
        lines.append("")
    c = r.composer
    if c and not c.error:
        lines.append(
            f"Composer: {c.steps} steps (tiny preset) in {c.straight_run_s:.0f} s, loss "
            f"{c.first_loss:.3f} -> {c.last_loss:.3f}; a second run killed (SIGKILL) after "
            f"{c.killed_at} steps and rerun: it resumed for {len(c.resumed_steps)} steps "
            f"({_span(c.resumed_steps)}), max |loss diff| {c.max_abs_loss_diff:.3g}."
        )
        lines.append("")
    budgets = ", ".join(f"{k} {v:.0f} s" for k, v in r.budgets.items())
    took = ", ".join(f"{k} {v:.0f} s" for k, v in r.elapsed_s.items())
    lines.append(f"- budgets: {budgets} (total {sum(r.budgets.values()):.0f} s); took: {took}")
    lines += [f"- {n}" for n in r.notes]
    pending = [p for p in r.parts if p not in r.done]
    if pending:
        lines.append(f"- not run yet: {', '.join(pending)}")
    fails = failures(r)
    lines += [f"- FAIL: {f}" for f in fails]
    if not pending:
        lines.append(f"- verdict: {'FAIL' if fails else 'PASS'}")
    return "\n".join(lines)


def write(r: Results, out: Path) -> None:
    """`out` (markdown) and `out` with .json, and both under $OUT when it is set."""
    text = report(r) + "\n"
    data = json.dumps(asdict(r), indent=1, default=str) + "\n"
    targets = [out]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"], "gpu_check.md"))
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.with_suffix(".json").write_text(data)
