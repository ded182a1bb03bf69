"""`make gpu-check`: prove the GPU path on one GPU with no network, in under 8 minutes.

    PYTHONPATH=src python3 bench/gpu_check.py [--parts backends throughput composer] [--sizes 150m 400m 1b]
        [--contexts 1024 8192] [--bundle .gpu] [--out bench/gpu_check.md] [--dry-run | --smoke]

Three parts, each printed as markdown ready for bench/RESULTS.md (also written to `--out`, and
to $OUT/gpu_check.md when $OUT is set):

1. **backends**: every attention backend that is available (flash if flash_attn imports, flex,
   torch) runs one bf16-autocast forward and backward of a 150m encoder and decoder with local
   windows, on variable-length padded rows and on packed rows, against an fp32 reference (torch
   backend, no autocast). A fast backend passes when its relative error (hidden states;
   gradients of all parameters) is within 1.5x the torch backend's own bf16 error (+1e-4):
   bf16 noise for this model is ~0.1, so a fixed tolerance would be meaningless.
2. **throughput**: bf16 autocast + per-block `torch.compile` (`ettin.parallel.compile`) training
   steps of 150m, 400m and 1b at 1024 and 8192 tokens, on *fresh* variable-length packed rows
   every microbatch (a reused batch would hide recompiles), StableAdamW stepping every `--accum`
   microbatches. Reports tokens/s, MFU by `ettin.flops`, peak memory and the number of compiled
   graphs (which must not grow while timing).
3. **composer**: `src/main.py` on the tiny preset for 130 Composer steps on the GPU (past batch
   101, where a host-tensor all_reduce used to stop NCCL runs), bf16 + compile, checkpoint every
   60 steps; a second run is killed with SIGKILL after its step-60 checkpoint and rerun with
   the same command; its losses are compared with the uninterrupted run's.

The GPU machine has its own torch and no package index. Parts 1-2 need only torch (plus numpy);
part 3 needs Composer and friends: `make wheelhouse` (on a machine with the network) writes
`.gpu/` with the wheels (installed here with `pip --no-deps --target`), the tokenizer and a small
prepared dataset; carry that folder. `--dry-run` prints the plan and exits; `--smoke` runs parts
1-2 on the CPU at the `test` size (plumbing only, numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("backends", "throughput", "composer")
MLM_P = 0.3
TOKENS_PER_MICROBATCH = {"150m": 65536, "400m": 32768, "1b": 16384, "test": 2048}
REFERENCE = {"150m": (296e3, 0.29), "400m": (146e3, 0.37), "1b": (64e3, 0.40)}  # tok/s/GPU, MFU
BUDGET_S = 8 * 60
COMPOSER_STEPS, COMPOSER_SAVE = 130, 60


def log(msg: str) -> None:
    print(msg, flush=True)


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
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def build_model(size: str, objective: str, device: torch.device):
    from ettin.model import EttinModel, model_args

    torch.manual_seed(0)
    return EttinModel(model_args(size, causal=objective == "clm")).to(device).train()


def available_backends(device: torch.device) -> list[str]:
    """The attention backends this machine can run: flash (CUDA + flash_attn), flex, torch."""
    from ettin.model import attention

    names = []
    if device.type == "cuda" and attention.flash_attn_varlen_func is not None:
        names.append("flash")
    if hasattr(attention, "flex_attention"):
        names.append("flex")
    return [*names, "torch"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- part 1


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


def check_backends(size: str, device: torch.device, rows: int, context: int) -> list[BackendRow]:
    out = []
    backends = available_backends(device)
    for objective in ("mlm", "clm"):
        model = build_model(size, objective, device)
        for layout in ("padded", "packed"):
            rng = np.random.default_rng(1)
            batch = make_batch(
                rng, rows, context, model.args.vocab_size, objective, device, layout == "packed"
            )
            ref_h, ref_g, _ = _run(model, batch, "torch", autocast=False, device=device)
            base_h, base_g, _ = _run(model, batch, "torch", autocast=True, device=device)
            f_lim, b_lim = 1.5 * _rel(base_h, ref_h) + 1e-4, 1.5 * _rel(base_g, ref_g) + 1e-4
            for impl in backends:
                _run(model, batch, impl, autocast=True, device=device)  # warm-up (flex compiles)
                h, g, seconds = _run(model, batch, impl, autocast=True, device=device)
                row = BackendRow(
                    objective, layout, impl, _rel(h, ref_h), _rel(g, ref_g), f_lim, b_lim, seconds
                )
                log(
                    f"  {objective} {layout:6s} {impl:5s}: fwd {row.fwd_err:.2e} (limit "
                    f"{f_lim:.2e}), bwd {row.bwd_err:.2e} (limit {b_lim:.2e}), "
                    f"{seconds * 1e3:.1f} ms {'ok' if row.ok else 'FAIL'}"
                )
                out.append(row)
        del model
    return out


# ----------------------------------------------------------------------------- part 2


@dataclass
class ThroughputRow:
    size: str
    context: int
    backend: str
    compiled: str
    tok_s: float
    mfu: float | None
    peak_gib: float | None
    graphs_after_warmup: int
    graphs_after_timing: int


def _optimizer(model):
    """The training optimiser (StableAdamW via ettin.optim) if its dependencies import."""
    try:
        from ettin.config import OptimConfig
        from ettin.optim import build_optimizer

        return build_optimizer(model, OptimConfig()), "StableAdamW"
    except ImportError as err:  # omegaconf / optimi not carried: the step cost is what we time
        return torch.optim.AdamW(model.parameters(), lr=1e-4), f"AdamW ({err.name} missing)"


def _backend_name(model, device: torch.device) -> str:
    from ettin.model import attention_backend

    fn = attention_backend(device, model.attn_impl).__name__
    return next(name for name in ("flash", "flex", "torch") if name in fn)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_throughput(
    size: str, context: int, device: torch.device, accum: int, steps: int, do_compile: bool
) -> ThroughputRow:
    from ettin.flops import flops_per_token, peak_flops

    model = build_model(size, "mlm", device)
    compiled = "no"
    if do_compile:
        from ettin.parallel.compile import compile_model

        torch._dynamo.reset()
        compile_model(model)
        compiled = "per block"
    opt, opt_name = _optimizer(model)
    rng = np.random.default_rng(0)
    rows = max(1, TOKENS_PER_MICROBATCH.get(size, 16384) // context)

    def step() -> tuple[int, float]:
        tokens, flops = 0, 0.0
        for _ in range(accum):
            batch = make_batch(rng, rows, context, model.args.vocab_size, "mlm", device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
            loss.backward()
            mask = batch["attention_mask"].cpu().numpy()
            for r in range(rows):
                for n in np.bincount(mask[r])[1:]:
                    if n:
                        tokens += int(n)
                        flops += n * flops_per_token(model.args, int(n), mlm_probability=MLM_P)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens, flops

    for _ in range(2):  # warm-up: compilation, then the first dynamic-shape recompile
        step()
    warm_graphs = _graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    tokens = flops = 0.0
    for _ in range(steps):
        n, f = step()
        tokens, flops = tokens + n, flops + f
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_flops(device)
    row = ThroughputRow(
        size=size,
        context=context,
        backend=_backend_name(model, device),
        compiled=compiled,
        tok_s=tokens / seconds,
        mfu=flops / seconds / peak if peak else None,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        graphs_after_warmup=warm_graphs,
        graphs_after_timing=_graphs(),
    )
    mfu = f", MFU {row.mfu:.1%}" if row.mfu else ""
    log(
        f"  {size} @ {context}: {row.tok_s:,.0f} tok/s{mfu}, graphs {warm_graphs} -> "
        f"{row.graphs_after_timing} ({opt_name})"
    )
    return row  # the model and optimiser go with this frame; main() empties the CUDA cache


# ----------------------------------------------------------------------------- part 3


def composer_env(bundle: Path) -> dict[str, str]:
    """Environment for the Composer runs: the carried wheels installed once under /tmp."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    probe = [sys.executable, "-c", "import composer, streaming, optimi, hydra, transformers"]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return env
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"Composer is not importable and {bundle / 'wheels'} has no wheels: run "
            "`make wheelhouse` on a machine with the network and carry the .gpu folder"
        )
    site = Path("/tmp/ettin-site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target"]
    subprocess.run([*cmd, str(site), *map(str, wheels)], check=True)
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    return env


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


def _losses(run_dir: Path) -> dict[int, float]:
    rows = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "loss/train/total" in row:
            rows[row["batch"]] = row["loss/train/total"]
    return rows


def check_composer(bundle: Path, work: Path, smoke: bool) -> dict:
    env = composer_env(bundle)
    straight, killed = work / "gpu-check-straight", work / "gpu-check-killed"
    t0 = time.perf_counter()
    subprocess.run(composer_command(bundle, straight, smoke), env=env, check=True)
    straight_s = time.perf_counter() - t0
    proc = subprocess.Popen(composer_command(bundle, killed, smoke), env=env)
    while proc.poll() is None and max(_losses(killed), default=0) < COMPOSER_SAVE + 2:
        time.sleep(0.5)
    kill_step = max(_losses(killed), default=0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(composer_command(bundle, killed, smoke), env=env, check=True)
    a, b = _losses(straight), _losses(killed)
    common = sorted(set(a) & set(b))
    diff = max((abs(a[k] - b[k]) for k in common), default=float("nan"))
    result = {
        "steps": max(a, default=0),
        "killed_at": kill_step,
        "resumed_steps": len(common),
        "max_abs_loss_diff": diff,
        "straight_run_s": straight_s,
    }
    log(f"  composer: {result}")
    return result


# ----------------------------------------------------------------------------- report


def environment(device: torch.device) -> str:
    from ettin.model import attention

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    flash = "installed" if attention.flash_attn_varlen_func is not None else "not installed"
    return (
        f"Device: {name}; python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), flash-attn {flash}; {time.strftime('%Y-%m-%d %H:%M %Z')}."
    )


def report(env: str, backends: list, throughput: list, composer: dict | None, notes: list) -> str:
    lines = [env, ""]
    if backends:
        lines += [
            "| objective | rows | backend | fwd rel. err | limit | bwd rel. err | limit | step ms "
            "| torch time / this | |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        torch_s = {(b.objective, b.layout): b.step_s for b in backends if b.backend == "torch"}
        for b in backends:
            speed = torch_s.get((b.objective, b.layout), float("nan")) / b.step_s
            lines.append(
                f"| {b.objective} | {b.layout} | {b.backend} | {b.fwd_err:.2e} | {b.fwd_limit:.2e} "
                f"| {b.bwd_err:.2e} | {b.bwd_limit:.2e} | {b.step_s * 1e3:.1f} | {speed:.2f}x | "
                f"{'ok' if b.ok else 'FAIL'} |"
            )
        lines.append("")
    if throughput:
        lines += [
            "| size | context | backend | compiled | tokens/s | reference tok/s | MFU | ref MFU | "
            "peak GiB | graphs (warm -> timed) |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for t in throughput:
            ref = REFERENCE.get(t.size) if t.context == 1024 else None
            mfu = f"{t.mfu:.1%}" if t.mfu else "n/a"
            mem = f"{t.peak_gib:.1f}" if t.peak_gib is not None else "n/a"
            lines.append(
                f"| {t.size} | {t.context} | {t.backend} | {t.compiled} | {t.tok_s:,.0f} | "
                f"{f'{ref[0]:,.0f}' if ref else '-'} | {mfu} | {f'{ref[1]:.0%}' if ref else '-'} "
                f"| {mem} | {t.graphs_after_warmup} -> {t.graphs_after_timing} |"
            )
        lines.append("")
    if composer:
        lines.append(
            f"Composer: {composer['steps']} steps (tiny preset, bf16 + compile) in "
            f"{composer['straight_run_s']:.0f} s; a second run killed (SIGKILL) at step "
            f"{composer['killed_at']} and rerun: {composer['resumed_steps']} steps compared, "
            f"max |loss diff| {composer['max_abs_loss_diff']:.3g}."
        )
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def plan(args, device: torch.device) -> str:
    lines = [f"device: {device}; backends: {', '.join(available_backends(device))}"]
    if "backends" in args.parts:
        lines.append(f"backends: {args.backend_size} mlm+clm, padded+packed, vs fp32 torch")
    if "throughput" in args.parts:
        cells = [f"{s}@{c}" for s in args.sizes for c in args.contexts]
        lines.append(f"throughput: {' '.join(cells)}, accum {args.accum}, {args.steps} steps")
    if "composer" in args.parts:
        cmd = composer_command(args.bundle, Path("runs/gpu-check-straight"), args.smoke)
        lines.append("composer: " + " ".join(cmd[1:]))
        lines.append(f"bundle: {args.bundle} (wheels, tokenizer, data: `make wheelhouse`)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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

    if args.smoke:
        device = torch.device("cpu")
        args.sizes, args.contexts, args.backend_size = ["test"], [256], "test"
        args.accum, args.steps, args.no_compile = 1, 1, True
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device = torch.device("cpu")
        if not args.dry_run:
            print("gpu_check: no CUDA here; use --smoke (CPU plumbing) or --dry-run")
            return 2
    log(plan(args, device))
    if args.dry_run:
        return 0

    start, notes = time.perf_counter(), []
    backends, throughput, composer = [], [], None
    if "backends" in args.parts:
        log("[1/3] backends against fp32")
        rows, ctx = (2, 128) if args.smoke else (8, 1024)
        backends = check_backends(args.backend_size, device, rows, ctx)
    if "throughput" in args.parts:
        log("[2/3] throughput (bf16 autocast, compile per block, fresh variable-length batches)")
        for size in args.sizes:
            for context in args.contexts:
                if time.perf_counter() - start > BUDGET_S - 150 and not args.smoke:
                    notes.append(f"{size} @ {context}: skipped to stay inside the time budget")
                    continue
                try:
                    throughput.append(
                        check_throughput(
                            size, context, device, args.accum, args.steps, not args.no_compile
                        )
                    )
                except torch.OutOfMemoryError:
                    notes.append(f"{size} @ {context}: out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if "composer" in args.parts:
        log("[3/3] Composer: 130 steps, kill -9 after the step-60 checkpoint, resume")
        try:
            composer = check_composer(args.bundle, args.work, args.smoke)
        except (RuntimeError, subprocess.CalledProcessError) as err:
            notes.append(f"composer part failed: {err}")
    notes.append(f"gpu_check took {time.perf_counter() - start:.0f} s")
    text = report(environment(device), backends, throughput, composer, notes)
    log("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text + "\n")
    composer_failed = composer is None and "composer" in args.parts
    return 1 if composer_failed or any(not b.ok for b in backends) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
