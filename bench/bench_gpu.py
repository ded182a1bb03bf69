"""GPU training speed: the flash-attn varlen path against the PyTorch path, and tokens/s + MFU.

    .venv/bin/python bench/bench_gpu.py [--sizes 150m 400m 1b] [--contexts 1024 8192]
        [--objective mlm] [--part backends throughput] [--json PATH]

Without CUDA it prints "skipped: no CUDA" and exits 0 (`--smoke` runs the plumbing on the CPU
with the tiny `test` preset instead; its numbers mean nothing).

1. backends: one 150m training step (forward + backward, bf16 autocast, no compile) with
   `attn_impl="flash"` against `attn_impl="torch"` (the exact SDPA path: re-pad, mask, gather),
   on the same batches, interleaved pairs, median ratio; at 1024 with variable lengths
   (log-normal, as bench_model.py) and at 8192 with full rows.
2. throughput: for each size and context, `torch.compile(model)` (as `compile: true` does in
   training), fp32 weights under bf16 autocast (Composer's amp_bf16), flash backend,
   StableAdamW from `ettin.optim.build_optimizer` (optimi's Triton kernels) stepping every
   `--accum` microbatches. Microbatches are full rows (one sequence of `context` tokens each,
   as in the reference's packed throughput), `--tokens` per microbatch, halved on OOM.
   tokens/s/GPU = real tokens / wall time over whole optimizer steps after warm-up;
   MFU = sum over sequences of S * flops_per_token(S) / time / peak, with `ettin.flops`
   (windowed layers priced by their window; MLM heads on 30% of positions) and the dense bf16
   peak of `ettin.flops.peak_flops`.

The reference Ettin runs report about 296k (150m), 146k (400m) and 64k (1b) tokens/s/GPU at
1024, MFU about 29%, 37% and 40%; the table prints our figures against those. The markdown
block at the end (device, versions, date, numbers) is meant for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch._inductor.config

REFERENCE = {  # size -> (tokens/s/GPU at 1024, MFU) of the reference runs
    "150m": (296e3, 0.29),
    "400m": (146e3, 0.37),
    "1b": (64e3, 0.40),
}
TARGET_SPEEDUP = 1.3
TARGET_MFU = {"150m": 0.40, "400m": 0.45, "1b": 0.45}
MLM_P = 0.3


def _device_batch(
    lengths: list[int], width: int, vocab: int, objective: str, device, seed: int
) -> dict[str, torch.Tensor]:
    """Right-padded rows of random ids (ids do not change the cost); 30% MLM targets."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(0, vocab, (B, width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    if objective == "mlm":
        picked = (torch.rand(B, width, generator=g) < MLM_P) & (mask > 0)
        batch["labels"] = torch.where(picked, ids, torch.full_like(ids, -100))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _build(size: str, objective: str, device, smoke: bool):
    from ettin.model import EttinModel, model_args

    torch.manual_seed(0)
    args = model_args("test" if smoke else size, causal=objective == "clm")
    return EttinModel(args).to(device).train()


def _optimizer(model: torch.nn.Module):
    from ettin.config import OptimConfig
    from ettin.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig())
    if next(model.parameters()).device.type == "cpu":  # optimi 0.3.3 would pick Triton on a CPU
        for group in opt.param_groups:
            if group.get("triton") is None:
                group["triton"] = False
    return opt


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model, batch, device, dtype) -> None:
    with torch.autocast(device.type, dtype=dtype):
        loss = model(batch["input_ids"], batch["attention_mask"], batch.get("labels")).loss
    loss.backward()


# ----------------------------------------------------------------------------- part 1


@dataclass
class BackendResult:
    size: str
    setting: str
    flash_tok_s: float
    torch_tok_s: float
    ratio: float  # median over pairs of torch time / flash time


def bench_backends(size, objective, device, dtype, smoke, repeats, log) -> list[BackendResult]:
    from bench_model import LengthSampler

    model = _build(size, objective, device, smoke)
    vocab = model.args.vocab_size
    size = "test (smoke)" if smoke else size
    sampler = LengthSampler(None)
    settings = {
        "1024 var x32": lambda i: [int(n) for n in sampler.draw(4 if smoke else 32)],
        "8192 full x2": lambda i: [256 if smoke else 8192] * 2,
    }
    out = []
    for name, draw in settings.items():
        times = {"flash": [], "torch": []}
        real = []
        for i in range(repeats + 1):
            lengths = draw(i)
            batch = _device_batch(lengths, max(lengths), vocab, objective, device, seed=i)
            impls = ("flash", "torch") if i % 2 == 0 else ("torch", "flash")
            for impl in impls:
                model.attn_impl = "torch" if smoke else impl  # no flash-attn on a CPU
                model.zero_grad(set_to_none=True)
                _sync(device)
                t0 = time.perf_counter()
                _train_step(model, batch, device, dtype)
                _sync(device)
                if i > 0:  # pair 0 warms both paths up
                    times[impl].append(time.perf_counter() - t0)
            if i > 0:
                real.append(sum(lengths))
        ratios = [t / f for t, f in zip(times["torch"], times["flash"])]
        r = BackendResult(
            size=size,
            setting=name,
            flash_tok_s=statistics.median(n / t for n, t in zip(real, times["flash"])),
            torch_tok_s=statistics.median(n / t for n, t in zip(real, times["torch"])),
            ratio=statistics.median(ratios),
        )
        log(f"  backends {size} {name}: flash/torch {r.ratio:.2f}x")
        out.append(r)
    del model
    return out


# ----------------------------------------------------------------------------- part 2


@dataclass
class ThroughputResult:
    size: str
    context: int
    microbatch_tokens: int
    accum: int
    compiled: str
    tok_s: float
    mfu: float | None
    peak_mem_gb: float | None
    ref_tok_s: float | None
    speedup_vs_ref: float | None
    ref_mfu: float | None
    target_mfu: float | None


def _measure_throughput(step_model, opt, batch, accum, opt_steps, device, dtype) -> float:
    """Seconds per microbatch over `opt_steps` optimizer steps, after one warm-up step."""
    for phase in ("warm-up", "timed"):
        n = 1 if phase == "warm-up" else opt_steps
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            for _ in range(accum):
                _train_step(step_model, batch, device, dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        seconds = time.perf_counter() - t0
    return seconds / (opt_steps * accum)


def bench_throughput(
    size, context, objective, device, dtype, smoke, tokens, accum, opt_steps, compile_mode, log
) -> ThroughputResult:
    from ettin.flops import flops_per_token, peak_flops

    model = _build(size, objective, device, smoke)
    model.attn_impl = "torch" if smoke else "flash"
    label = "test (smoke)" if smoke else size
    opt = _optimizer(model)
    # torch 2.7's inductor fuses `residual (fp32) + mm (bf16 under autocast)` into one addmm of
    # mixed dtypes and fails at run time; without its pattern matcher the model compiles.
    attempts = [("model", True), ("model, pattern_matcher off", False)]
    if compile_mode != "model":
        attempts = []
    step_model, compiled = model, "no"
    rows = max(1, tokens // context)
    while True:
        if step_model is model and attempts:
            compiled, pattern_matcher = attempts.pop(0)
            torch._dynamo.reset()
            torch._inductor.config.pattern_matcher = pattern_matcher
            step_model = torch.compile(model)
        batch = _device_batch(
            [context] * rows, context, model.args.vocab_size, objective, device, 0
        )
        try:
            per_micro = _measure_throughput(step_model, opt, batch, accum, opt_steps, device, dtype)
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            del batch
            torch.cuda.empty_cache()
            if rows == 1:
                raise
            rows //= 2
            log(f"  {size} @ {context}: out of memory, retrying with {rows} rows")
        except Exception as err:  # compile trouble: report it, try the next way, else eager
            if step_model is model:
                raise
            log(
                f"  {size} @ {context}: torch.compile ({compiled}) failed: {type(err).__name__}: "
                f"{str(err)[:200]}"
            )
            step_model = model
            if not attempts:
                compiled = f"no (compile failed: {type(err).__name__})"
            opt.zero_grad(set_to_none=True)
    torch._inductor.config.pattern_matcher = True
    micro_tokens = rows * context
    tok_s = micro_tokens / per_micro
    p = MLM_P if objective == "mlm" else 1.0
    flops = rows * context * flops_per_token(model.args, context, mlm_probability=p)
    peak = peak_flops(device)
    mfu = flops / per_micro / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ref = REFERENCE.get(size) if context == 1024 and not smoke else None
    result = ThroughputResult(
        size=label,
        context=context,
        microbatch_tokens=micro_tokens,
        accum=accum,
        compiled=compiled,
        tok_s=tok_s,
        mfu=mfu,
        peak_mem_gb=mem,
        ref_tok_s=ref[0] if ref else None,
        speedup_vs_ref=tok_s / ref[0] if ref else None,
        ref_mfu=ref[1] if ref else None,
        target_mfu=TARGET_MFU.get(size),
    )
    log(
        f"  {size} @ {context}: {tok_s:,.0f} tok/s, MFU {mfu:.1%}"
        if mfu
        else f"  {size} @ {context}: {tok_s:,.0f} tok/s"
    )
    del model, step_model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


# ----------------------------------------------------------------------------- report


def environment(device) -> dict[str, str]:
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "cuda": str(torch.version.cuda),
    }
    for module in ("flash_attn", "triton", "optimi"):
        try:
            env[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            env[module] = "not installed"
    return env


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def report(env, backends, throughput) -> str:
    lines = [
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), flash-attn "
        f"{env['flash_attn']}, triton {env['triton']}, optimi {env['optimi']}; {env['date']}.",
        "",
    ]
    if backends:
        lines += [
            "| size | batch | flash tok/s | torch tok/s | flash / torch |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {b.size} | {b.setting} | {b.flash_tok_s:,.0f} | {b.torch_tok_s:,.0f} | {b.ratio:.2f}x |"
            for b in backends
        ]
        lines.append("")
    if throughput:
        lines += [
            "| size | context | tokens/microbatch x accum | compiled | tokens/s/GPU | reference | "
            f"ours / ref (target {TARGET_SPEEDUP}x) | MFU | ref MFU | target MFU | peak GiB |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in throughput:
            ref = f"{t.ref_tok_s:,.0f}" if t.ref_tok_s else "-"
            speed = f"{t.speedup_vs_ref:.2f}x" if t.speedup_vs_ref else "-"
            mem = f"{t.peak_mem_gb:.1f}" if t.peak_mem_gb is not None else "n/a"
            lines.append(
                f"| {t.size} | {t.context} | {t.microbatch_tokens} x {t.accum} | {t.compiled} | "
                f"{t.tok_s:,.0f} | {ref} | {speed} | {_pct(t.mfu)} | "
                f"{_pct(t.ref_mfu) if t.ref_mfu else '-'} | {_pct(t.target_mfu)} | {mem} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["150m", "400m", "1b"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192])
    parser.add_argument("--objective", default="mlm", choices=["mlm", "clm"])
    parser.add_argument(
        "--part", nargs="+", default=["backends", "throughput"], choices=["backends", "throughput"]
    )
    parser.add_argument("--backend-size", default="150m", help="model of the backend comparison")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs, backend comparison")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per microbatch (start)")
    parser.add_argument("--accum", type=int, default=4, help="microbatches per optimizer step")
    parser.add_argument("--opt-steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--compile", default="model", choices=["model", "none"])
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check, test preset")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.bfloat16
        args.tokens, args.accum, args.opt_steps, args.repeats = 512, 1, 1, 1
    elif not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    env = environment(device)
    print(f"bench_gpu: {env['device']}, torch {env['torch']}, flash-attn {env['flash_attn']}")

    def log(s: str) -> None:
        print(s, flush=True)

    backends, throughput = [], []
    if "backends" in args.part:
        backends = bench_backends(
            args.backend_size, args.objective, device, dtype, args.smoke, args.repeats, log
        )
    if "throughput" in args.part:
        for size in args.sizes:
            for context in args.contexts:
                ctx = min(context, 256) if args.smoke else context
                throughput.append(
                    bench_throughput(
                        size,
                        ctx,
                        args.objective,
                        device,
                        dtype,
                        args.smoke,
                        max(args.tokens, ctx),
                        args.accum,
                        args.opt_steps,
                        args.compile,
                        log,
                    )
                )
    text = report(env, backends, throughput)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "settings": vars(args),
                    "backends": [asdict(b) for b in backends],
                    "throughput": [asdict(t) for t in throughput],
                    "markdown": text,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
