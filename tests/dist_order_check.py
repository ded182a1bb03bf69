"""Run by tests/test_order.py under `composer -n 2` (CPU, gloo): the order seen by two real ranks.

    composer -n 2 tests/dist_order_check.py PHASE_DIR OUT_DIR

1. Builds the training DataSpec on each rank, iterates two epochs and writes, on rank 0,
   `OUT_DIR/batches.json` = {"epoch/step": the step's sample ids, rank 0's then rank 1's}.
2. Trains a tiny model with Composer for 5 steps (checkpoint at step 3), then resumes a new
   Trainer from that checkpoint and trains to step 26 (into epoch 1), recording the consumed order with
   `DataOrderRecorder` into `OUT_DIR/recorded/`.
The test compares both with the single-process order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import tiny_composer_model, tiny_tokenizer

SETTINGS = {
    "max_seq_len": 24,
    "batch_size_warmup_tokens": f"{40 * 24}tok",
    "batch_size_warmup_min": 4,
}
GLOBAL_BATCH = 8
SEED = 5


def build_spec(phase: str, rank: int, world: int, objective: str = "mlm"):
    from ettin.config import DataConfig, ObjectiveConfig
    from ettin.data import build_dataloader

    cfg = DataConfig(path=phase, **SETTINGS)
    return build_dataloader(
        cfg,
        ObjectiveConfig(name=objective),
        tiny_tokenizer(),
        split="train",
        global_batch_size=GLOBAL_BATCH,
        rank=rank,
        world_size=world,
        seed=SEED,
        microbatch_size=2,
    )


def trainer(spec, out: Path, max_duration: str, load_path: str | None = None):
    import torch
    from composer import Trainer

    from ettin.callbacks.data_order import DataOrderRecorder

    model = tiny_composer_model(len(tiny_tokenizer()))
    return Trainer(
        model=model,
        train_dataloader=spec,
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        device="cpu",
        device_train_microbatch_size=2,
        accumulate_train_batch_on_tokens=True,
        save_folder=str(out / "ckpt"),
        save_filename="ba{batch}-rank{rank}.pt",
        save_interval="3ba",
        save_overwrite=True,
        load_path=load_path,
        callbacks=[DataOrderRecorder(out / "recorded")],
        progress_bar=False,
        log_to_console=False,
        spin_dataloaders=False,
        seed=SEED,
    )


def main(phase: str, out_dir: str) -> None:
    from composer.utils import dist

    dist.initialize_dist("cpu")
    rank, world = dist.get_global_rank(), dist.get_world_size()
    out = Path(out_dir)

    spec = build_spec(phase, rank, world)
    sampler = spec.dataloader.batch_sampler
    mine = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for k, batch in enumerate(spec.dataloader):
            mine[f"{epoch}/{k}"] = batch["sample_id"].tolist()
    gathered = dist.all_gather_object(mine)
    if rank == 0:
        merged = {key: sum((g[key] for g in gathered), []) for key in gathered[0]}
        (out / "batches.json").write_text(json.dumps(merged))

    first = trainer(build_spec(phase, rank, world), out, "5ba")
    first.fit()
    first.close()
    resumed = trainer(
        build_spec(phase, rank, world), out, "26ba", load_path=str(out / "ckpt" / "ba3-rank0.pt")
    )
    resumed.fit()
    if rank == 0:
        (out / "done.json").write_text(
            json.dumps({"world_size": world, "batch": int(resumed.state.timestamp.batch)})
        )
    resumed.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
