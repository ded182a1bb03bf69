"""Loader throughput for the 150m phase-1 setting against what the model consumes on one GPU.

    .venv/bin/python bench/bench_loader.py [--steps 3] [--workers 0] [--model-tok-per-s 300000]

Setting: max_seq_len 1024, global batch 4608 over 4 GPUs = 1152 sequences per rank per step,
microbatch 72 (reference §2.2, size "base" = 150m). The corpus is synthetic MDS shards shaped
like phase-1 chunks (70% full 1024-token chunks, the rest 64-1023 tokens), written with
MDSWriter in a temp folder; the tokenizer is the offline Ettin one when built
(`ettin tokenizer build`), otherwise a stand-in with the same 50368 ids.

Baseline (an assumption, not measured here): a 150m model trains at about 300k tokens/s on one
H100 in bf16 (`--model-tok-per-s`). The ratio printed is loader tokens/s / model tokens/s per
rank: above 1 the loader keeps up; with W workers per rank it scales about W-fold (the
reference ran 6 workers per GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 1024
RANK_BATCH = 4608 // 4
MICROBATCH = 72


def _tokenizer():
    from ettin.tokenizer import default_tokenizer_dir, load_tokenizer

    path = default_tokenizer_dir()
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path), f"Ettin tokenizer ({path})"
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(50280)}
    for j, name in enumerate(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]):
        vocab[name] = 50280 + j
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(
        [AddedToken(t, special=True) for t in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]]
    )
    tok.add_tokens([f"[unused{i}]" for i in range(83)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    return fast, "stand-in tokenizer with the Ettin ids"


def _write_corpus(root: Path, tok, n: int) -> None:
    """A prepared phase as `ettin prep` lays it out (meta.json + MDS train split)."""
    import json

    from streaming import MDSWriter

    from ettin.objectives import token_sets
    from ettin.prep.job import MDS_COLUMNS, SHARD_HASHES
    from ettin.tokenizer import tokenizer_fingerprint

    rng = np.random.default_rng(0)
    _, ordinary = token_sets(tok)
    lengths = np.where(rng.random(n) < 0.7, SEQ, rng.integers(64, SEQ, n))
    samples = []
    for length in lengths:
        body = rng.choice(ordinary, size=int(length) - 2).astype(np.uint32)
        samples.append(
            np.concatenate([[tok.cls_token_id], body, [tok.sep_token_id]]).astype(np.uint32)
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"tokenizer": tokenizer_fingerprint(tok)}))
    cols, size = MDS_COLUMNS, 1 << 26
    with MDSWriter(
        out=str(root / "train"), columns=cols, hashes=SHARD_HASHES, size_limit=size
    ) as w:
        for i, ids in enumerate(samples):
            w.write({"input_ids": ids, "source": "bench", "id": f"doc{i}"})


def _measure(root: Path, tok, objective: str, packing: bool, workers: int, steps: int) -> dict:
    from ettin.config import DataConfig, ObjectiveConfig
    from ettin.data import build_dataloader

    cfg = DataConfig(path=str(root), max_seq_len=SEQ, packing=packing, num_workers=workers)
    spec = build_dataloader(
        cfg,
        ObjectiveConfig(name=objective),
        tok,
        split="train",
        global_batch_size=RANK_BATCH,  # one rank's share, as a single-rank loader
        rank=0,
        world_size=1,
        seed=21,
        microbatch_size=MICROBATCH,
    )
    it = iter(spec.dataloader)
    next(it)  # warm: worker start-up and first reads are not steady state
    start, tokens, cells, samples = time.perf_counter(), 0, 0, 0
    for _ in range(steps):
        batch = next(it)
        tokens += spec.get_num_tokens_in_batch(batch)
        cells += batch["attention_mask"].numel()
        samples += spec.get_num_samples_in_batch(batch)
    seconds = time.perf_counter() - start
    return {
        "tok_s": tokens / seconds,
        "batches_s": steps / seconds,
        "samples_s": samples / seconds,
        "fill": tokens / cells,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="per-rank batches timed per setting")
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers (0 = in the main process)"
    )
    parser.add_argument(
        "--model-tok-per-s", type=float, default=300_000, help="assumed 150m training speed, 1 GPU"
    )
    args = parser.parse_args()

    tok, tok_name = _tokenizer()
    need = RANK_BATCH * (args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        _write_corpus(Path(tmp), tok, need)
        print(
            f"corpus: {need} synthetic chunks written in {time.perf_counter() - t:.1f}s; {tok_name}"
        )
        print(
            f"setting: 150m phase 1, seq {SEQ}, {RANK_BATCH} sequences per rank per step "
            f"(4608 / 4 GPUs), microbatch {MICROBATCH}, {args.workers} worker(s)"
        )
        print(f"baseline: model consumes {args.model_tok_per_s:,.0f} tok/s per GPU (assumed)")
        header = f"{'objective':>9} {'layout':>7} {'batches/s':>10} {'samples/s':>10} {'tok/s':>11} {'fill':>6} {'loader/model':>13}"
        print(header)
        for objective, packing in (("mlm", False), ("clm", False), ("mlm", True)):
            r = _measure(Path(tmp), tok, objective, packing, args.workers, args.steps)
            ratio = r["tok_s"] / args.model_tok_per_s
            layout = "packed" if packing else "padded"
            print(
                f"{objective:>9} {layout:>7} {r['batches_s']:>10.3f} {r['samples_s']:>10.0f} "
                f"{r['tok_s']:>11,.0f} {r['fill']:>6.3f} {ratio:>12.2f}x"
            )
        print("loader/model = loader tok/s over model tok/s per rank; >= 1.0x keeps the GPU fed.")


if __name__ == "__main__":
    main()
