"""Continuing a reference training run with our trainer (`ettin import REF.pt --resume-into`).

The training layer: it builds a trainer from the run config (`ettin.train.build_trainer`) and
fills it through the reference format's converters (`ettin.interop.reference`): weights,
StableAdamW state, timestamp, scheduler position and data position, saved as a checkpoint of the
run that its autoresume picks up. The format knows nothing of trainers; this module is the only
place that joins the two.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from composer.core import Timestamp

from ettin.checkpoint import (
    CHECKPOINT_FILENAME,
    RunInfo,
    load_weights,
    prepare_resume,
    run_checkpoints,
)
from ettin.config import RunConfig
from ettin.interop.reference import (
    ReferenceCheckpoint,
    ReferenceFormatError,
    load_optimizer_state,
    read_reference,
)
from ettin.model import ModelArgs
from ettin.train import build_trainer

log = logging.getLogger(__name__)

__all__ = ["check_fits_run", "resume_into", "with_reference_model"]

_COMPARED = (
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "vocab_size",
    "global_attn_every_n_layers",
    "local_attention",
    "local_window",
    "global_rope_theta",
    "local_rope_theta",
    "norm_eps",
)


def with_reference_model(cfg: RunConfig, ref: ReferenceCheckpoint) -> RunConfig:
    """`cfg` with the model settings a reference checkpoint fixes: a decoder's causal window."""
    if not ref.model_args.causal or cfg.model.causal_window == ref.model_args.causal_window:
        return cfg
    model = dataclasses.replace(cfg.model, causal_window=ref.model_args.causal_window)
    return dataclasses.replace(cfg, model=model)


def check_fits_run(ref: ReferenceCheckpoint, run_args: ModelArgs, run_label: str) -> None:
    """Refuse a run whose model differs from the checkpoint's (another size, objective, RoPE,
    window)."""
    if ref.model_args.causal != run_args.causal:
        raise ReferenceFormatError(
            f"{ref.source} is a {ref.kind} checkpoint but {run_label} trains a "
            f"{'decoder (objective=clm)' if run_args.causal else 'encoder (objective=mlm)'}; "
            f"resume with objective={ref.objective}, or start the other objective from its "
            f"weights only with init_from={ref.source}"
        )
    diffs = [
        f"{k}: checkpoint {getattr(ref.model_args, k)}, run {getattr(run_args, k)}"
        for k in _COMPARED
        if getattr(ref.model_args, k) != getattr(run_args, k)
    ]
    if diffs:
        raise ReferenceFormatError(
            f"{ref.source} does not fit {run_label} ({'; '.join(diffs)}): a checkpoint of another "
            "size or phase; pick the run file of the same size and phase (model.size, "
            "model.*_rope_theta, model.local_attention, model.causal_window)"
        )


def _set_schedule(state, ref: ReferenceCheckpoint, batch: int) -> None:
    """The LR of the next step and the LambdaLR counters, as Composer leaves them at `batch`.

    Composer steps the scheduler after each batch, before advancing the timestamp, so the LR a
    checkpoint holds is the schedule one step behind its timestamp; that value is taken from the
    reference's param groups (the LR its next step would have used). Later steps follow the run
    config's schedule. Without an LR in the reference, the schedule at `batch` is used.
    """
    groups = state.optimizers[0].param_groups
    for scheduler in state.schedulers:
        scheduler.last_epoch = batch - 1
        scheduler.step()  # the schedule at the restored timestamp (the fallback)
        scheduler._step_count = batch + 1
    theirs = [g.get("lr") for g in ref.optimizer_groups]
    if len(theirs) == len(groups) and all(isinstance(lr, float | int) for lr in theirs):
        for group, lr in zip(groups, theirs):
            group["lr"] = float(lr)
        for scheduler in state.schedulers:
            scheduler._last_lr = [float(lr) for lr in theirs]


def resume_into(
    path: str | os.PathLike, cfg: RunConfig, *, weights_only: bool = False
) -> tuple[Path, RunConfig]:
    """Write a checkpoint of our trainer into `cfg.run_dir/checkpoints` that continues `path`.

    `cfg` is the RunConfig the run will be resumed with (same size, objective, data, batch size);
    what the reference checkpoint fixes about the computation (a decoder's causal window) is set
    from it (`with_reference_model`; the resumed run must say the same, `train` checks). A
    trainer is built from it (in a scratch folder), the reference's weights, optimiser moments
    and step counters, timestamp, scheduler position and data position (`sample_in_epoch`) are
    put into it, and it is saved as `ep{e}-ba{b}-rank0.pt` with `latest-rank0.pt` pointing at it.
    Running the same config again then resumes there (autoresume). `weights_only` keeps the
    timestamp but starts fresh optimizer moments (for a checkpoint without optimiser state).
    Returns the checkpoint written and the config to resume with.
    """
    ref = read_reference(path)
    cfg = with_reference_model(cfg, ref)
    run_dir = Path(cfg.run_dir)
    folder = run_dir / "checkpoints"
    if run_checkpoints(folder):
        raise ReferenceFormatError(
            f"{folder} already holds checkpoints; resume into a new run folder (run_dir=...)"
        )
    if not ref.moments and not weights_only:
        raise ReferenceFormatError(
            f"{ref.source} has no optimizer state; pass --weights-only to resume with fresh "
            f"moments, or start with init_from={ref.source}"
        )
    stamp = ref.timestamp
    if not stamp.get("batch"):
        raise ReferenceFormatError(
            f"{ref.source} has no timestamp (batch 0): use init_from= instead"
        )
    with tempfile.TemporaryDirectory(prefix="ettin-resume-") as tmp:
        scratch = dataclasses.replace(cfg, run_dir=tmp, autoresume=False, init_from=None)
        trainer = build_trainer(scratch)
        try:
            model = trainer.state.model.model
            check_fits_run(ref, model.args, f"the run {cfg.run_name}")
            load_weights(model, ref.state, source=ref.source)
            if not weights_only:
                load_optimizer_state(trainer.state.optimizers[0], model, ref)
            fields = {
                k: int(stamp[k])
                for k in (
                    "epoch",
                    "batch",
                    "sample",
                    "token",
                    "batch_in_epoch",
                    "sample_in_epoch",
                    "token_in_epoch",
                    "iteration",
                    "epoch_in_iteration",
                    "token_in_iteration",
                )
                if k in stamp
            }
            fields.setdefault("batch_in_epoch", fields["batch"])
            fields.setdefault("sample_in_epoch", fields.get("sample", 0))
            fields.setdefault("token_in_epoch", fields.get("token", 0))
            # Composer's schedulers read the iteration counters (one iteration: the whole run)
            fields.setdefault("epoch_in_iteration", fields.get("epoch", 0))
            fields.setdefault("token_in_iteration", fields.get("token", 0))
            trainer.state.timestamp = Timestamp(**fields)
            dataset = getattr(trainer.state.train_dataloader, "dataset", None)
            sampler = getattr(dataset, "sampler", None)
            if sampler is not None:
                sampler.set_epoch(fields.get("epoch", 0))
            batch = fields["batch"]
            _set_schedule(trainer.state, ref, batch)
            (info,) = [c for c in trainer.state.callbacks if isinstance(c, RunInfo)]
            info.info.lineage = {
                **info.info.lineage,
                "resumed_from_reference": ref.source,
                "reference_run": ref.run_name,
            }
            name = CHECKPOINT_FILENAME.format(epoch=fields.get("epoch", 0), batch=batch, rank=0)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            trainer.save_checkpoint(str(target))
        finally:
            trainer.close()
    prepare_resume(folder)  # points latest-rank0.pt at it
    log.info("wrote %s (batch %d of %s)", target, batch, ref.source)
    return target, cfg
