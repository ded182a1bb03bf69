"""The cost of the flex BlockMask per microbatch: per block from the sequence ids (ours) vs
create_block_mask over every token pair (what ettin built before), CPU, same process.

    PYTHONPATH=src python bench/bench_block_mask.py [--tokens 2048 8192 16384] [--repeats 5]

Each microbatch needs two masks (the global and the local pattern of one objective). The
streams are packed 1024-token rows of log-normal documents (median ~400 tokens), as
gpu_check's batches. Both constructions are timed interleaved (median of `--repeats`), and
their blocks are checked to be the same. Prints ms per microbatch and old/new.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from ettin.model.attention import FLEX_BLOCK_SIZE, _flex_mask_mod, document_block_mask

PATTERNS = {
    "mlm": [((-1, -1), False), ((64, 64), False)],
    "clm": [((-1, -1), True), ((127, 0), True)],
}


def stream(rng: np.random.Generator, tokens: int, context: int = 1024) -> torch.Tensor:
    """Sequence ids (T_pad,) of `tokens // context` packed rows, padding tail id N."""
    lengths = []
    for _ in range(tokens // context):
        room = context
        while room > 0:
            n = min(room, int(np.clip(rng.lognormal(np.log(400), 1.0), 8, context)))
            lengths.append(n)
            room -= n
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    T_pad = max(2, -(-seq.shape[0] // FLEX_BLOCK_SIZE)) * FLEX_BLOCK_SIZE
    return F.pad(seq, (0, T_pad - seq.shape[0]), value=len(lengths))


def old(seq, window, causal):
    T = seq.shape[0]
    mod = _flex_mask_mod(seq, window, causal)
    return create_block_mask(mod, None, None, T, T, device="cpu", BLOCK_SIZE=FLEX_BLOCK_SIZE)


def timed(fn, seq, objective) -> tuple[float, list]:
    t0 = time.perf_counter()
    masks = [fn(seq, window, causal) for window, causal in PATTERNS[objective]]
    return time.perf_counter() - t0, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| tokens/microbatch | objective | blocks (partial + full) | old ms | new ms | old/new |")
    print("|---:|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for tokens in args.tokens:
        for objective in PATTERNS:
            times = {"old": [], "new": []}
            for r in range(args.repeats + 1):  # the first pair is a warm-up
                seq = stream(rng, tokens)
                t_old, m_old = timed(old, seq, objective)
                t_new, m_new = timed(document_block_mask, seq, objective)
                for a, b in zip(m_old, m_new):
                    assert a.to_dense().equal(b.to_dense()), "different blocks"
                if r:
                    times["old"].append(t_old)
                    times["new"].append(t_new)
            blocks = sum(int(m.kv_num_blocks.sum() + m.full_kv_num_blocks.sum()) for m in m_new)
            o, n = (statistics.median(times[k]) * 1e3 for k in ("old", "new"))
            print(
                f"| {tokens} | {objective} | {blocks} | {o:.1f} | {n:.2f} | {o / n:.0f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
