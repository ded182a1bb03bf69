"""`make gpu-check`: prove the GPU path on one GPU with no network, in under 8 minutes.

    PYTHONPATH=src python3 -m ettin_gpu [--parts backends throughput composer] [--sizes 150m 400m 1b]
        [--contexts 1024 8192] [--bundle .gpu] [--out bench/gpu_check.md] [--dry-run | --smoke]

Setup, then three parts; after each, the report so far is written as markdown ready for
bench/RESULTS.md to `--out` (and `.json` beside it), and to $OUT/gpu_check.md when $OUT is set,
so a run cut short still leaves what it measured. The exit code is 1 when any part's criterion
fails (`verdict.failures`), and each part has a time budget (`verdict.BUDGETS`, printed by
`--dry-run`, < 8 minutes in all): what would not fit is skipped, named, and fails the check.

0. **setup**: unless Composer already imports, the wheels of `.gpu/` (`make wheelhouse`) are
   installed with `pip install --no-index --no-deps --target <work>/gpu-site` and put on the
   path of this process (parts 1-2 need omegaconf and torch-optimi for StableAdamW) and of the
   Composer runs.
1. **backends**: every attention backend that trains here (`ettin.model.attention.
   available_backends`: flash, flex, torch) runs one bf16-autocast forward and backward of a
   150m encoder and decoder with local windows, on variable-length padded rows and on packed
   rows, against an fp32 reference (torch backend, no autocast, TF32 off). Passes when each
   relative error (hidden states; gradients of all parameters), the torch backend's included,
   is within the bound that bf16's precision sets on this model and batch: `BF16_FACTOR` times
   the error of the same fp32 step with every matmul's operands and result rounded to bf16
   (`bf16_rounding`, no autocast, no bf16 kernel), plus `BF16_FLOOR` (`verdict.backend_limit`).
   The bound comes from no backend's bf16 run, so no row can loosen its own.
2. **throughput**: bf16 autocast + per-block `torch.compile` training steps of 150m, 400m and 1b
   encoders at 1024 and 8192 tokens and a 150m decoder at 1024, on variable-length packed rows,
   a new layout every microbatch (a reused batch would hide recompiles), generated and pinned
   before the clock starts, StableAdamW stepping every `--accum` microbatches. Tokens and
   FLOPs come from the host masks. Reports tokens/s, MFU two ways (the head on the scored 30%
   of positions, as trained; on every position, the reference runs' convention), peak memory
   and the compiled graphs. Passes when the graphs do not grow while timing, the compiled loss
   equals the eager one on the same batch, no loss is NaN, nothing runs out of memory, and the
   optimiser is ettin's StableAdamW.
3. **composer**: `src/main.py` on the tiny preset for 130 Composer steps (past batch 101, where
   a host-tensor all_reduce used to stop NCCL runs), bf16 + compile, deterministic, checkpoint
   every 60 steps; a second run is killed with SIGKILL after its step-60 checkpoint and rerun
   with the same command. Passes when the uninterrupted run logs 130 steps with a falling loss,
   the kill came between the checkpoint and the end, the rerun logs exactly steps 60..129 (it
   resumed) and its losses equal the uninterrupted run's.

The GPU machine has its own torch and no package index: carry `.gpu/` (`make wheelhouse`).
`--dry-run` prints the plan and the budgets and exits; `--smoke` runs everything on the CPU at
the `test` size with no budget (plumbing only, numbers meaningless): `make gpu-standin` runs it
on a CPU stand-in of the GPU machine (Python 3.12, torch 2.11).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ettin_gpu.verdict import (
    BF16_FACTOR,
    BF16_FLOOR,
    BUDGETS,
    COMPOSER_SAVE,
    COMPOSER_STEPS,
    THROUGHPUT_CELL_S,
    TOTAL_BUDGET_S,
    BackendRow,
    ComposerResult,
    Results,
    ThroughputRow,
    backend_limit,
    failures,
    write,
)

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: the check runs `src/main.py` on `yamls/tiny/` and reads `.gpu/` from there."""

PARTS = ("backends", "throughput", "composer")
MLM_P = 0.3
TOKENS_PER_MICROBATCH = {"150m": 65536, "400m": 32768, "1b": 16384, "test": 2048}
WARMUP_STEPS = 2  # compilation, then the first dynamic-shape recompile
COMPOSER_IMPORTS = "import composer, streaming, optimi, hydra, omegaconf, transformers"


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- time


class Clock:
    """Deadlines from the budgets: part p must end by start + the budgets up to p (no limit
    in smoke runs, whose CPU times mean nothing)."""

    def __init__(self, limited: bool) -> None:
        self.start, self.limited = time.perf_counter(), limited

    def deadline(self, part: str) -> float:
        if not self.limited:
            return math.inf
        names = list(BUDGETS)
        return self.start + sum(BUDGETS[n] for n in names[: names.index(part) + 1])

    def fits(self, part: str, seconds: float) -> bool:
        return time.perf_counter() + seconds <= self.deadline(part)

    def left(self, part: str) -> float:
        return self.deadline(part) - time.perf_counter()


# ----------------------------------------------------------------------------- batches


def lengths_for_row(rng: np.random.Generator, context: int) -> list[int]:
    """Sequence lengths filling one row of `context` tokens: log-normal documents, cut to fit."""
    out, room = [], context
    while room > 0:
        n = int(np.clip(rng.lognormal(np.log(min(400, context // 2)), 1.0), 8, context))
        n = min(n, room)
        out.append(n)
        room -= n
    return out


def make_batch(
    rng: np.random.Generator,
    rows: int,
    context: int,
    vocab: int,
    objective: str,
    device: torch.device,
    packed: bool = True,
) -> dict[str, torch.Tensor]:
    """Packed rows (segment ids 1..k) or right-padded rows of one sequence each; random ids."""
    mask = np.zeros((rows, context), dtype=np.int64)
    for r in range(rows):
        if packed:
            start = 0
            for k, n in enumerate(lengths_for_row(rng, context), start=1):
                mask[r, start : start + n] = k
                start += n
        else:
            mask[r, : lengths_for_row(rng, context)[0]] = 1
    ids = rng.integers(0, vocab, size=(rows, context))
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if objective == "mlm":
        picked = (rng.random((rows, context)) < MLM_P) & (mask > 0)
        batch["labels"] = torch.from_numpy(np.where(picked, ids, -100))
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sequence_lengths(mask: torch.Tensor) -> list[int]:
    """Lengths of the sequences of a host (B, S) segment-id mask."""
    return [int(n) for row in mask.numpy() for n in np.bincount(row)[1:] if n]


def build_model(size: str, objective: str, device: torch.device):
    from ettin.model import EttinModel, model_args

    torch.manual_seed(0)
    return EttinModel(model_args(size, causal=objective == "clm")).to(device).train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# ----------------------------------------------------------------------------- setup


def bundle_env(bundle: Path, work: Path) -> dict[str, str]:
    """Environment for the Composer runs, with the carried wheels installed if they are needed.

    The wheels go to a fresh `<work>/gpu-site` exactly as on the GPU machine, and that folder
    joins this process's path too (StableAdamW needs omegaconf and torch-optimi).
    """
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    probe = [sys.executable, "-c", COMPOSER_IMPORTS]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return env
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"Composer is not importable and {bundle / 'wheels'} has no wheels: run "
            "`make wheelhouse` on a machine with the network and carry the .gpu folder"
        )
    site = (work / "gpu-site").resolve()
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target"]
    done = subprocess.run([*cmd, str(site), *map(str, wheels)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing {bundle / 'wheels'} failed: {done.stderr.strip()[-800:]}")
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    if subprocess.run(probe, env=env, capture_output=True).returncode != 0:
        err = subprocess.run(probe, env=env, capture_output=True, text=True).stderr
        raise RuntimeError(f"the installed wheels do not import: {err.strip().splitlines()[-1]}")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return env


# ----------------------------------------------------------------------------- part 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _run(
    model, batch, impl: str, autocast: bool, device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(hidden states at real tokens, all parameter gradients flat, seconds) for one step."""
    model.attn_impl = impl
    model.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        loss = model(batch["input_ids"], batch["attention_mask"], batch.get("labels")).loss
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    real = batch["attention_mask"] != 0
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return hidden[real].detach().float(), grads, seconds


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bf16 and back (its gradient is rounded the same way on the way back)."""
    return t.to(torch.bfloat16).to(t.dtype)


@contextlib.contextmanager
def bf16_rounding(model: torch.nn.Module):
    """Every `nn.Linear` of `model` rounds its input, weight and output to bf16, computing in fp32.

    That is the precision bf16 autocast gives every matmul (bf16 operands, fp32 accumulation, a
    bf16 result), without autocast and without any bf16 kernel: the error it causes is what
    bf16 costs this model on this batch, measured by a path no backend's bf16 run shares.
    """
    import torch.nn.functional as F

    def forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else _bf16(module.bias)
        return _bf16(F.linear(_bf16(x), _bf16(module.weight), bias))

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        m.forward = functools.partial(forward, m)  # an instance attribute: the class's is kept
    try:
        yield model
    finally:
        for m in linears:
            del m.forward


def check_backends(size: str, device: torch.device, rows: int, context: int) -> list[BackendRow]:
    from ettin.model.attention import available_backends

    out = []
    backends = available_backends(device)
    set_tf32(False)  # the fp32 reference is fp32
    for objective in ("mlm", "clm"):
        model = build_model(size, objective, device)
        for layout in ("padded", "packed"):
            rng = np.random.default_rng(1)
            batch = make_batch(
                rng, rows, context, model.args.vocab_size, objective, device, layout == "packed"
            )
            ref_h, ref_g, _ = _run(model, batch, "torch", autocast=False, device=device)
            with bf16_rounding(model):
                emu_h, emu_g, _ = _run(model, batch, "torch", autocast=False, device=device)
            f_lim, b_lim = backend_limit(_rel(emu_h, ref_h)), backend_limit(_rel(emu_g, ref_g))
            for impl in backends:
                _run(model, batch, impl, autocast=True, device=device)  # warm-up (flex compiles)
                h, g, seconds = _run(model, batch, impl, autocast=True, device=device)
                row = BackendRow(
                    objective, layout, impl, _rel(h, ref_h), _rel(g, ref_g), f_lim, b_lim, seconds
                )
                log(
                    f"  {objective} {layout:6s} {impl:5s}: fwd {row.fwd_err:.2e} (bound "
                    f"{f_lim:.2e}), bwd {row.bwd_err:.2e} (bound {b_lim:.2e}), "
                    f"{seconds * 1e3:.1f} ms {'ok' if row.ok else 'FAIL'}"
                )
                out.append(row)
        del model
    return out


# ----------------------------------------------------------------------------- part 2


def _backend_name(model, device: torch.device) -> str:
    from ettin.model import attention_backend

    fn = attention_backend(device, model.attn_impl).__name__
    return next(name for name in ("flash", "flex", "torch") if name in fn)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _loss(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return model(batch["input_ids"], batch["attention_mask"], batch.get("labels")).loss


def check_throughput(
    size: str,
    context: int,
    objective: str,
    device: torch.device,
    accum: int,
    steps: int,
    do_compile: bool,
    deadline: float = math.inf,
) -> ThroughputRow:
    """One cell: compiled training steps on fresh pre-generated batches; the timed loop stops at
    `deadline` (after one step at least)."""
    from ettin.config import OptimConfig
    from ettin.flops import flops_per_token, peak_flops
    from ettin.optim import build_optimizer

    set_tf32(True)
    model = build_model(size, objective, device)
    opt = build_optimizer(model, OptimConfig())
    row = ThroughputRow(size, context, objective, optimizer=type(opt).__name__)
    row.backend = _backend_name(model, device)
    rng = np.random.default_rng(0)
    rows = max(1, TOKENS_PER_MICROBATCH.get(size, 16384) // context)
    scored = MLM_P if objective == "mlm" else 1.0
    batches = []  # (host batch, tokens, FLOPs as trained, FLOPs with every position scored)
    for _ in range(accum * (WARMUP_STEPS + steps)):
        host = make_batch(rng, rows, context, model.args.vocab_size, objective, torch.device("cpu"))
        if device.type == "cuda":
            host = {k: v.pin_memory() for k, v in host.items()}
        lengths = sequence_lengths(host["attention_mask"])
        f_scored = sum(n * flops_per_token(model.args, n, mlm_probability=scored) for n in lengths)
        f_all = sum(n * flops_per_token(model.args, n) for n in lengths)
        batches.append((host, sum(lengths), f_scored, f_all))
    stream = iter(batches)

    def step() -> tuple[int, float, float, list[torch.Tensor]]:
        tokens, f_scored, f_all, losses = 0, 0.0, 0.0, []
        for _ in range(accum):
            host, n, fs, fa = next(stream)
            batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
            loss = _loss(model, batch, device)
            loss.backward()
            tokens, f_scored, f_all = tokens + n, f_scored + fs, f_all + fa
            losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens, f_scored, f_all, losses

    first = {k: v.to(device) for k, v in batches[0][0].items()}
    with torch.no_grad():
        row.loss_eager = float(_loss(model, first, device))
    if do_compile:
        from ettin.parallel.compile import compile_model

        torch._dynamo.reset()
        compile_model(model)
        row.compiled = "per block"
    for i in range(WARMUP_STEPS):
        losses = step()[3]
        if i == 0:  # batch 0 again, compiled, before the first optimiser step: same weights
            row.loss_compiled = float(losses[0])
    row.graphs_after_warmup = _graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    tokens = f_scored = f_all = 0.0
    last = None
    for _ in range(steps):
        n, fs, fa, losses = step()
        last = losses[-1]
        tokens, f_scored, f_all, row.steps = tokens + n, f_scored + fs, f_all + fa, row.steps + 1
        if time.perf_counter() > deadline:
            break
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_flops(device)
    row.tok_s = tokens / seconds
    row.mfu_scored = f_scored / seconds / peak if peak else None
    row.mfu_all = f_all / seconds / peak if peak else None
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    row.graphs_after_timing = _graphs()
    row.loss_last = float(last) if last is not None else math.nan
    mfu = f", MFU {row.mfu_scored:.1%} scored / {row.mfu_all:.1%} all" if row.mfu_all else ""
    log(
        f"  {size} @ {context} {objective}: {row.tok_s:,.0f} tok/s{mfu}, graphs "
        f"{row.graphs_after_warmup} -> {row.graphs_after_timing}, loss eager "
        f"{row.loss_eager:.4f} compiled {row.loss_compiled:.4f} ({row.optimizer})"
    )
    return row  # the model and optimiser go with this frame; main() empties the CUDA cache


# ----------------------------------------------------------------------------- part 3


def composer_command(bundle: Path, run_dir: Path, smoke: bool) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "src/main.py"),
        str(ROOT / "yamls/tiny/encoder.yaml"),
        f"data_root={bundle / 'data'}",
        f"tokenizer={bundle / 'tokenizer'}",
        f"run_name={run_dir.name}",
        f"run_dir={run_dir}",
        f"max_duration={COMPOSER_STEPS}ba",
        f"save_interval={COMPOSER_SAVE}ba",
        "precision=fp32" if smoke else "precision=amp_bf16",
        f"compile={'false' if smoke else 'true'}",
        "deterministic=true",
        "eval_subset_num_batches=2",
        "callbacks.export_hf=false",
        "logging.console_interval=20ba",
    ]


def losses(path: Path) -> dict[int, float]:
    """step -> training loss from a metrics.jsonl, complete lines only (the file may be growing)."""
    rows = {}
    text = path.read_text() if path.exists() else ""
    for line in text.split("\n")[:-1]:  # the piece after the last newline is not written yet
        row = json.loads(line)
        if "loss/train/total" in row:
            rows[int(row["batch"])] = row["loss/train/total"]
    return rows


def _run_logged(cmd: list[str], env: dict, log_path: Path, timeout: float) -> None:
    """Run a Composer command with its output in `log_path`; its last lines if it fails."""
    with log_path.open("w") as out:
        try:
            done = subprocess.run(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{log_path.name}: ran out of the part's time budget") from None
    if done.returncode != 0:
        tail = " / ".join(log_path.read_text().strip().splitlines()[-4:])
        raise RuntimeError(f"{log_path.name}: exit {done.returncode}: {tail}")


def check_composer(
    env: dict, bundle: Path, work: Path, smoke: bool, deadline: float = math.inf
) -> ComposerResult:
    straight, killed = work / "gpu-check-straight", work / "gpu-check-killed"
    for run in (straight, killed):
        shutil.rmtree(run, ignore_errors=True)  # a leftover run would autoresume
    work.mkdir(parents=True, exist_ok=True)
    result = ComposerResult()
    t0 = time.perf_counter()
    left = lambda: max(1.0, deadline - time.perf_counter())  # noqa: E731
    _run_logged(
        composer_command(bundle, straight, smoke), env, work / f"{straight.name}.log", left()
    )
    result.straight_run_s = time.perf_counter() - t0
    with (work / f"{killed.name}.log").open("w") as out:
        proc = subprocess.Popen(
            composer_command(bundle, killed, smoke), env=env, stdout=out, stderr=subprocess.STDOUT
        )
        metrics = killed / "metrics.jsonl"
        while proc.poll() is None and len(losses(metrics)) < COMPOSER_SAVE + 2:
            if time.perf_counter() > deadline:
                proc.kill()
                raise RuntimeError("the run to be killed ran out of the part's time budget")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
    logged = losses(metrics)
    result.killed_at = max(logged) + 1 if rc == -signal.SIGKILL and logged else None
    if metrics.exists():  # what the rerun logs then stands alone: the resumed steps only
        metrics.rename(killed / "metrics.killed.jsonl")
    _run_logged(composer_command(bundle, killed, smoke), env, work / "gpu-check-rerun.log", left())
    a, b = losses(straight / "metrics.jsonl"), losses(metrics)
    result.steps = len(a)
    result.resumed_steps = sorted(b)
    common = [k for k in result.resumed_steps if k in a]
    result.max_abs_loss_diff = max((abs(a[k] - b[k]) for k in common), default=math.nan)
    if a:
        result.first_loss, result.last_loss = a[min(a)], a[max(a)]
    log(
        f"  composer: {result.steps} steps, killed at {result.killed_at}, resumed "
        f"{len(result.resumed_steps)} steps, max |loss diff| {result.max_abs_loss_diff:.3g}"
    )
    return result


# ----------------------------------------------------------------------------- main


def environment(device: torch.device) -> str:
    from ettin.model import attention

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    flash = "installed" if attention.flash_attn_varlen_func is not None else "not installed"
    return (
        f"Device: {name}; python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), numpy {np.__version__}, flash-attn {flash}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}."
    )


def cells(args) -> list[tuple[str, int, str]]:
    """(size, context, objective) of the throughput part: every size x context as an encoder,
    and the first of each as a decoder."""
    return [(s, c, "mlm") for s in args.sizes for c in args.contexts] + [
        (args.sizes[0], args.contexts[0], "clm")
    ]


def plan(args, device: torch.device) -> str:
    from ettin.model.attention import available_backends

    lines = [f"device: {device}; backends: {', '.join(available_backends(device))}"]
    budget = {"setup": BUDGETS["setup"]}
    lines.append(f"setup: install {args.bundle / 'wheels'} unless Composer imports")
    if "backends" in args.parts:
        budget["backends"] = BUDGETS["backends"]
        lines.append(
            f"backends: {args.backend_size} mlm+clm, padded+packed, vs fp32 torch; bound "
            f"{BF16_FACTOR:g}x fp32 with bf16 rounding emulated, + {BF16_FLOOR:g}"
        )
    if "throughput" in args.parts:
        todo = [f"{s}@{c}{'' if o == 'mlm' else ' clm'}" for s, c, o in cells(args)]
        budget["throughput"] = BUDGETS["throughput"]
        lines.append(
            f"throughput: {' '.join(todo)}, accum {args.accum}, {args.steps} steps, "
            f"{THROUGHPUT_CELL_S} s a cell"
        )
    if "composer" in args.parts:
        budget["composer"] = BUDGETS["composer"]
        cmd = composer_command(args.bundle, Path("runs/gpu-check-straight"), args.smoke)
        lines.append("composer: " + " ".join(cmd[1:]))
        lines.append(f"bundle: {args.bundle} (wheels, tokenizer, data: `make wheelhouse`)")
    lines.append(
        "budgets: "
        + ", ".join(f"{k} {v} s" for k, v in budget.items())
        + f"; total {sum(budget.values())} s of {TOTAL_BUDGET_S} s (limit 480 s)"
        + (" (not enforced in --smoke)" if args.smoke else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ettin_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--sizes", nargs="+", default=["150m", "400m", "1b"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192])
    parser.add_argument("--backend-size", default="150m")
    parser.add_argument("--accum", type=int, default=2, help="microbatches per optimiser step")
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps")
    parser.add_argument("--no-compile", action="store_true", help="throughput without compile")
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--work", type=Path, default=ROOT / "runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/gpu_check.md")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    mode.add_argument("--smoke", action="store_true", help="CPU plumbing check at the test size")
    args = parser.parse_args(argv)
    args.work, args.bundle = args.work.resolve(), args.bundle.resolve()

    if args.smoke:
        device = torch.device("cpu")
        args.sizes, args.contexts, args.backend_size = ["test"], [256], "test"
        args.accum, args.steps, args.no_compile = 1, 1, True
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        if not args.dry_run:
            print("gpu_check: no CUDA here; use --smoke (CPU plumbing) or --dry-run")
            return 2
    log(plan(args, device))
    if args.dry_run:
        return 0

    clock = Clock(limited=not args.smoke)
    r = Results(environment(device), parts=list(args.parts))
    env = None
    t0 = time.perf_counter()
    try:
        env = bundle_env(args.bundle, args.work)
    except (RuntimeError, OSError) as err:
        r.errors["setup"] = str(err)
    r.elapsed_s["setup"] = time.perf_counter() - t0
    write(r, args.out)

    if "backends" in args.parts:
        log("[1/3] backends against fp32")
        t0 = time.perf_counter()
        rows, ctx = (2, 128) if args.smoke else (8, 1024)
        try:
            r.backends = check_backends(args.backend_size, device, rows, ctx)
        except Exception as err:  # noqa: BLE001 - recorded, judged, and the next part runs
            r.errors["backends"] = f"{type(err).__name__}: {err}"
        r.elapsed_s["backends"] = time.perf_counter() - t0
        r.done.append("backends")
        write(r, args.out)
    if "throughput" in args.parts:
        log("[2/3] throughput (bf16 autocast, compile per block, fresh variable-length batches)")
        t0 = time.perf_counter()
        for size, context, objective in cells(args):
            name = f"{size}@{context} {objective}"
            if not clock.fits("throughput", THROUGHPUT_CELL_S):
                r.skipped.append(f"throughput {name} ({clock.left('throughput'):.0f} s left)")
                continue
            deadline = time.perf_counter() + THROUGHPUT_CELL_S if clock.limited else math.inf
            try:
                row = check_throughput(
                    size, context, objective, device, args.accum, args.steps,
                    not args.no_compile, deadline,
                )  # fmt: skip
            except torch.OutOfMemoryError:
                row = ThroughputRow(size, context, objective, error="out of memory")
            except Exception as err:  # noqa: BLE001 - recorded, judged, the next cell runs
                row = ThroughputRow(size, context, objective, error=f"{type(err).__name__}: {err}")
            r.throughput.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(r, args.out)
        r.elapsed_s["throughput"] = time.perf_counter() - t0
        r.done.append("throughput")
        write(r, args.out)
    if "composer" in args.parts:
        log(f"[3/3] Composer: {COMPOSER_STEPS} steps, kill -9 after the step-60 checkpoint, resume")
        t0 = time.perf_counter()
        if env is None:
            r.errors["composer"] = "not run: the setup failed"
        elif not clock.fits("composer", BUDGETS["composer"]):
            r.skipped.append(f"composer ({clock.left('composer'):.0f} s left)")
        else:
            try:
                r.composer = check_composer(
                    env, args.bundle, args.work, args.smoke, clock.deadline("composer")
                )
            except (RuntimeError, OSError, ValueError) as err:
                r.errors["composer"] = str(err)
        r.elapsed_s["composer"] = time.perf_counter() - t0
        r.done.append("composer")
    write(r, args.out)
    fails = failures(r)
    log("\n" + args.out.read_text())
    log(f"gpu_check: {'FAIL' if fails else 'PASS'} ({len(fails)} failed criteria)")
    return 1 if fails else 0
