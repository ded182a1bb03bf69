"""Small, fast fixtures for data tests: a tiny tokenizer and prepared phases written with MDSWriter.

The tiny tokenizer puts its special tokens *after* the words (as the Ettin tokenizer does), so
code that hard-codes ids fails on it. A phase is written exactly as `ettin prep` lays it out:
`<root>/meta.json` (tokenizer fingerprint) and `<root>/<split>/index.json` + MDS shards with
columns `input_ids: ndarray:uint32`, `source: str`, `id: str`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ettin.prep.job import MDS_COLUMNS as COLUMNS
from ettin.prep.job import SHARD_HASHES

BERT_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
"""The special tokens of the test tokenizers, each with its role (`unk_token`, `cls_token`, ...)."""


def word_tokenizer(
    words: Iterable[str],
    specials: Sequence[str] = BERT_SPECIALS,
    *,
    specials_first: bool = False,
    unused: int = 0,
    lowercase: bool = False,
    split_punctuation: bool = True,
    mark_special: bool = False,
    template: bool = True,
    pair: bool = False,
) -> Any:
    """A WordLevel fast tokenizer: `words` (ids in their order) and `specials` (after the words, as
    in the Ettin tokenizer, so that hard-coded ids fail; or first), then `unused` added tokens
    `[unusedN]`. Each of `specials` gets its role; `split_punctuation` pre-tokenizes with
    `Whitespace` (else `WhitespaceSplit`), `mark_special` also adds the specials to the backend
    as special tokens, `template` wraps texts as `[CLS] $A [SEP]` (`pair`: and pairs)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    order = [*specials, *words] if specials_first else [*words, *specials]
    vocab = {t: i for i, t in enumerate(order)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = (
        pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    )
    if mark_special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if unused:
        tok.add_tokens([f"[unused{i}]" for i in range(unused)])
    if template:
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]" if pair else None,
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    roles = {
        role: name
        for role, name in zip(
            ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token"), BERT_SPECIALS
        )
        if name in specials
    }
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def tiny_tokenizer(num_words: int = 60, num_unused: int = 3) -> Any:
    """A WordLevel fast tokenizer: w0..w{n-1}, then [UNK] [CLS] [SEP] [PAD] [MASK], then [unusedN]."""
    words = [f"w{i}" for i in range(num_words)]
    return word_tokenizer(words, unused=num_unused, split_punctuation=False, mark_special=True)


def random_samples(
    n: int,
    tokenizer: Any,
    *,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 40,
    bos: bool = True,
    eos: bool = True,
) -> list[np.ndarray]:
    """`n` documents of ordinary word ids (lengths in [min_len, max_len]) as stored by prep."""
    from ettin.objectives import token_sets

    _, ordinary = token_sets(tokenizer)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.choice(ordinary, size=int(rng.integers(min_len, max_len + 1)))
        parts = (
            ([tokenizer.cls_token_id] if bos else [])
            + body.tolist()
            + ([tokenizer.sep_token_id] if eos else [])
        )
        out.append(np.asarray(parts, np.uint32))
    return out


def write_split(
    split_dir: str | Path,
    samples: Iterable[np.ndarray],
    *,
    size_limit: int | None = 2048,
    columns: dict[str, str] | None = None,
) -> Path:
    """Write samples as MDS shards (several shards with the default small size limit), with the
    content hashes `ettin prep` records."""
    from streaming import MDSWriter

    split_dir = Path(split_dir)
    cols = columns or COLUMNS
    with MDSWriter(
        out=str(split_dir), columns=cols, size_limit=size_limit, hashes=SHARD_HASHES
    ) as writer:
        for i, ids in enumerate(samples):
            value = (
                np.asarray(ids, np.dtype(cols["input_ids"].split(":")[1]))
                if ":" in cols["input_ids"]
                else ids
            )
            writer.write({"input_ids": value, "source": "test", "id": f"doc{i}"})
    return split_dir


def write_phase(
    root: str | Path,
    tokenizer: Any,
    splits: dict[str, Sequence[np.ndarray]],
    *,
    size_limit: int | None = 2048,
    meta: dict | None = None,
) -> Path:
    """A prepared phase: meta.json with the tokenizer fingerprint and one MDS folder per split."""
    from ettin.data.shards import fingerprint as _fingerprint

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        write_split(root / split, samples, size_limit=size_limit)
    info = {"tokenizer": _fingerprint(tokenizer)} if meta is None else meta
    (root / "meta.json").write_text(json.dumps(info, indent=2))
    return root


def tiny_composer_model(vocab_size: int) -> Any:
    """A 2-parameter-tensor ComposerModel that trains on any batch (data-path tests)."""
    import torch
    from composer.models import ComposerModel

    class _Tiny(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab_size, 4)
            self.out = torch.nn.Linear(4, 1)

        def forward(self, batch: dict) -> torch.Tensor:
            x = self.emb(batch["input_ids"]) * (batch["attention_mask"] > 0).unsqueeze(-1)
            return self.out(x).mean()

        def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
            return outputs.pow(2)

    return _Tiny()


# ---------------------------------------------------------------- tiny Composer runs

WORDS = 60
"""Words of the tiny tokenizer used by the run tests (`counting_samples`, `write_world`)."""


def counting_samples(tok: Any, n: int, seed: int, words: int = WORDS) -> list[np.ndarray]:
    """`[CLS] k k+1 k+2 ... [SEP]` with random starts and lengths: learnable by both objectives."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, length = rng.integers(0, words), rng.integers(12, 40)
        body = (start + np.arange(length)) % words
        out.append(np.concatenate([[tok.cls_token_id], body, [tok.sep_token_id]]).astype(np.uint32))
    return out


def write_world(root: Path, phases: Sequence[str] = ("pretrain",)) -> Path:
    """`root/tokenizer` (the tiny tokenizer) and `root/data/<phase>` prepared phases of counting
    samples (400 train, 48 val each): what the tiny run files need (`data_root`, `tokenizer`)."""
    tok = tiny_tokenizer(num_words=WORDS)
    tok.save_pretrained(root / "tokenizer")
    for i, phase in enumerate(phases):
        splits = {
            "train": counting_samples(tok, 400, 2 * i),
            "val": counting_samples(tok, 48, 2 * i + 1),
        }
        write_phase(root / "data" / phase, tok, splits)
    return root


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (each step must be logged once)."""
    out: dict[int, float] = {}
    for row in metric_rows(run_dir):
        if "loss/train/total" in row:
            assert row["batch"] not in out, f"step {row['batch']} logged twice"
            out[row["batch"]] = row["loss/train/total"]
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a launcher's --master_port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_RUN = Path(__file__).resolve().parents[1] / "yamls/tiny/encoder.yaml"
"""The tiny run file the run tests train with (on a `write_world` folder)."""


def tiny_overrides(
    world: Path, run: str, *extra: str, objective: str | None = "mlm", dropout: float | None = 0.0
) -> list[str]:
    """The overrides that put a tiny run file on a `write_world` folder: 48-token samples, the run
    in `world/runs/<run>`, `objective` (None: the run file's), no dropout (None: the run file's,
    the suite's 0.1); `extra` go last (of a key given twice, the last wins)."""
    return [
        *([] if objective is None else [f"objective={objective}"]),
        f"tokenizer={world / 'tokenizer'}",
        f"data_root={world / 'data'}",
        f"run_dir={world / 'runs' / run}",
        f"run_name={run}",
        "data.max_seq_len=48",
        *([] if dropout is None else [f"model.attn_out_dropout={dropout}"]),
        "logging.console_interval=100ba",
        *extra,
    ]


def tiny_config(world: Path, run: str, objective: str, *extra: str) -> Any:
    """The tiny run file (yamls/tiny/encoder.yaml) with `tiny_overrides`."""
    from ettin.config import load_config

    return load_config(TINY_RUN, tiny_overrides(world, run, *extra, objective=objective))


def stop_at(batch: int, *, kill: bool = False, message: str = "simulated preemption") -> Any:
    """A Composer callback that ends training at the end of batch `batch`: a KeyboardInterrupt (an
    in-process preemption), or with `kill` a SIGKILL of rank 0's own process (a real crash)."""
    import os
    import signal

    from composer.core import Callback
    from composer.utils import dist

    class StopAt(Callback):
        def batch_end(self, state: Any, logger: Any) -> None:
            if state.timestamp.batch.value != batch:
                return
            if not kill:
                raise KeyboardInterrupt(message)
            if dist.get_global_rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return StopAt()


def interrupted_fit(cfg: Any, batch: int, message: str = "simulated preemption") -> None:
    """Train `cfg` in-process and stop at the end of batch `batch` (`stop_at`): the checkpoints
    before it stay, as after a preemption; the trainer is closed and collected."""
    import gc

    import pytest

    from ettin.train import build_trainer

    trainer = build_trainer(cfg)
    trainer.state.callbacks.append(stop_at(batch, message=message))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    del trainer
    gc.collect()


# ---------------------------------------------------------------- published artefacts, mocked


def order_row(tok: Any, r: int, words: int = WORDS) -> list[int]:
    """Row `r` of a mock order tree: [CLS], its number in three base-`words` digits, [SEP]
    (unique per row, so every row can be counted where it is trained)."""
    digits = [r % words, (r // words) % words, r // (words * words)]
    return [tok.cls_token_id, *digits, tok.sep_token_id]


def write_order_tree(
    root: str | Path,
    tok: Any,
    folders: dict[str, int],
    *,
    batch: int,
    steps_per_part: int = 2,
    first_row: int = 0,
) -> dict[str, list[list[int]]]:
    """A mock `jhu-clsp/ettin-data-order` tree as its card lays it out: `<root>/<folder>/
    steps_000001_to_000002.parquet, steps_000003_to_000004.parquet, ...` (columns `step`,
    `input_ids` uint32), step numbers restarting at 1 in every folder, `batch` rows per step.
    `folders` maps each folder name (e.g. `checkpoint_000000`) to its number of steps. Returns
    each folder's rows in step order (rows are unique across the tree: `order_row`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    out: dict[str, list[list[int]]] = {}
    r = first_row
    for folder, steps in folders.items():
        out[folder] = []
        for a in range(1, steps + 1, steps_per_part):
            b = min(a + steps_per_part - 1, steps)
            step_col, rows = [], []
            for s in range(a, b + 1):
                for _ in range(batch):
                    rows.append(order_row(tok, r))
                    step_col.append(s)
                    r += 1
            out[folder] += rows
            path = root / folder / f"steps_{a:06d}_to_{b:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.table(
                {
                    "step": pa.array(step_col, pa.int64()),
                    "input_ids": pa.array(rows, pa.list_(pa.uint32())),
                }
            )
            pq.write_table(table, path)
    return out


def write_reference_phase(
    root: str | Path,
    splits: dict[str, dict[str, Sequence[np.ndarray]]],
    size_limit: int = 2048,
    *,
    hashes: Sequence[str] = ("sha1", "xxh64"),
    chunks: int = 0,
) -> Path:
    """A phase as the published Ettin phases hold it: per split, one folder per source written by
    the reference's `MDSWriter(columns={'input_ids': 'ndarray:uint32', 'id': 'str'},
    compression='zstd')` (zstd only: the writer removes the raw shards), merged into
    `<split>/index.json` with Streaming's `merge_index` (as the reference's
    create_final_dataset_index.py does); no meta.json. Shard basenames in the merged index are
    `<source>/shard.NNNNN.mds(.zstd)`. `hashes=()` is the reference writer's own default (index.json
    records `hashes: {}`); `chunks=k` splits each source into `<source>/chunk_<i>/` folders merged
    level by level (each with its own index.json, as the reference's make_recursive_root.py does),
    so basenames are `<source>/chunk_<i>/shard.NNNNN.mds(.zstd)`."""
    from streaming import MDSWriter
    from streaming.base.util import merge_index

    def write(out: Path, samples: Sequence[np.ndarray], name: str) -> None:
        with MDSWriter(
            out=str(out),
            columns={"input_ids": "ndarray:uint32", "id": "str"},
            compression="zstd",
            hashes=list(hashes) or None,
            size_limit=size_limit,
        ) as w:
            for i, ids in enumerate(samples):
                w.write({"input_ids": np.asarray(ids, np.uint32), "id": f"{name}-{i}"})

    def merge(folder: Path) -> None:
        merge_index([str(p) for p in sorted(folder.glob("*/index.json"))], str(folder))

    root = Path(root)
    for split, sources in splits.items():
        for source, samples in sources.items():
            if not chunks:
                write(root / split / source, samples, source)
                continue
            for c in range(chunks):
                write(root / split / source / f"chunk_{c}", samples[c::chunks], f"{source}-{c}")
            merge(root / split / source)
        merge(root / split)
    return root


class TrainingDevice:
    """Composer's training device, standing in for a GPU: remembers the tensors moved to it (the
    collective tests check that every tensor handed to a collective went through it)."""

    def __init__(self) -> None:
        self.moved: list[Any] = []

    def tensor_to_device(self, tensor: Any) -> Any:
        self.moved.append(tensor.clone())
        return self.moved[-1]


def scale_corpus(speeches: Sequence[Path], root: Path) -> dict[str, Path]:
    """Three sources cut from real speeches, in every shape `ettin prep` must read the same.

    `long`: jsonl.zst in two files with ids; `notes`: jsonl.gz paragraphs *without* ids (some
    empty); `plain`: text files (read with `max_docs`). Deterministic for a fixed list of files.
    """
    import gzip

    import zstandard

    texts = [p.read_text(encoding="utf-8") for p in speeches]
    long_dir, notes_dir, plain_dir = root / "long", root / "notes" / "sub", root / "plain"
    for d in (long_dir, notes_dir, plain_dir):
        d.mkdir(parents=True, exist_ok=True)
    for f in range(2):
        lines = [
            json.dumps({"id": f"speech-{i}", "text": t}) for i, t in enumerate(texts) if i % 2 == f
        ]
        raw = ("\n".join(lines) + "\n").encode()
        (long_dir / f"part-{f}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    paragraphs = [p for t in texts[:4] for p in t.split("\n\n")][:300]
    for f in range(3):
        rows = [json.dumps({"text": p, "n": i}) for i, p in enumerate(paragraphs) if i % 3 == f]
        rows.insert(1, json.dumps({"text": ""}))
        with gzip.open(notes_dir / f"n{f}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.write("\n".join(rows) + "\n")
    for i, t in enumerate(texts[:6]):
        (plain_dir / f"{i:02d}.txt").write_text(t[: 2000 + 500 * i], encoding="utf-8")
    return {"long": root / "long", "notes": root / "notes", "plain": plain_dir}


def scale_mixture(
    sources: dict[str, Path], tokenizer: str | Path, *, compression: str | None, shard_size: str
) -> dict:
    """A mixture with validation, upsampling, backfill, a source without ids and `.zst` input.

    With relative source paths and the `ettin` tokenizer, meta.json names nothing of this machine,
    so the files are the same everywhere (`tests/golden/prep_scale.json`).
    """
    return {
        "tokenizer": str(tokenizer),
        "compression": compression,
        "shard_size": shard_size,
        "split_seed": 3,
        "sources": {
            "long": {"path": str(sources["long"]), "format": "jsonl"},
            "notes": {"path": str(sources["notes"]), "format": "jsonl", "id_field": "id"},
            "plain": {"path": str(sources["plain"]), "format": "text", "max_docs": 4},
        },
        "phases": {
            "short": {
                "context_length": 256,
                "tokens": 900_000,
                "val_fraction": 0.1,
                "seed": 5,
                "mix": {"long": {"weight": 2}, "notes": {"weight": 1}, "plain": {"tokens": 20_000}},
            },
            "long": {
                "context_length": 1024,
                "val_fraction": 0.2,
                "seed": 6,
                "min_chunk_tokens": 64,
                "backfill_below": 300,
                "mix": {"long": {}, "plain": {}},
            },
        },
    }


def tree_sha1(root: Path) -> dict[str, str]:
    """sha1 of every file under `root`, by relative path."""
    import hashlib

    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
