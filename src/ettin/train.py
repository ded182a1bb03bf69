"""Build a Composer `Trainer` from a validated `RunConfig`; nothing else lives here."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from ettin.checkpoint import (
    CHECKPOINT_FILENAME,
    LATEST_FILENAME,
    CheckpointInfo,
    ResumePoint,
    RunInfo,
    load_weights,
    prepare_resume,
    state_digest,
)
from ettin.config import ConfigError, RunConfig, load_config, to_yaml

log = logging.getLogger(__name__)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_model(cfg: RunConfig, tokenizer: Any):
    """The model for this run: the size preset, the objective's mask, the tokenizer's ids."""
    from ettin.interop import check_tokenizer
    from ettin.model import EttinModel, model_args

    overrides = {
        k: getattr(cfg.model, k)
        for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads")
        if getattr(cfg.model, k) is not None
    }
    args = model_args(
        cfg.model.size,
        **overrides,
        vocab_size=max(_round_up(len(tokenizer), 8), 8),
        causal=cfg.objective.name == "clm",
        global_rope_theta=cfg.model.global_rope_theta,
        local_rope_theta=cfg.model.local_rope_theta,
        local_attention=cfg.model.local_attention,
        causal_window=cfg.model.causal_window,
        attn_out_dropout=cfg.model.attn_out_dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    check_tokenizer(tokenizer, args)
    model = EttinModel(args)
    model.attn_impl = cfg.model.attn_impl  # runtime settings, not weights
    model.deterministic = cfg.deterministic
    return model


def init_from_checkpoint(model, path: str) -> CheckpointInfo:
    """Load weights only (phase transition or cross-objective); time and optimiser start fresh."""
    if not Path(path).exists():
        from ettin.errors import CheckpointError

        raise CheckpointError(
            f"init_from={path} does not exist: run the previous stage first "
            "(or `ettin recipe` to run the chain), or point init_from at its checkpoint"
        )
    from ettin.interop.formats import read_any_checkpoint  # ours, or the reference's

    state, info = read_any_checkpoint(path)
    load_weights(model, state, source=path)
    if info.model_args.causal != model.args.causal:
        log.info(
            "cross-objective start: %s weights -> %s",
            info.objective,
            "clm" if model.args.causal else "mlm",
        )
    elif model.args.causal and info.model_args.local_window != model.args.local_window:
        log.warning(
            "%s was trained with the decoder window %s (model.causal_window=%s); this run trains "
            "with %s (model.causal_window=%s)",
            path,
            info.model_args.local_window,
            info.model_args.causal_window,
            model.args.local_window,
            model.args.causal_window,
        )
    return info


def _loggers(cfg: RunConfig, run_dir: Path) -> list:
    from ettin.callbacks.metrics_file import JSONLLogger

    loggers: list = []
    if cfg.logging.file:
        loggers.append(JSONLLogger(run_dir / "metrics.jsonl"))
    if cfg.logging.wandb_project:
        from composer.loggers import WandBLogger

        loggers.append(
            WandBLogger(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity)
        )
    if cfg.logging.tensorboard:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(run_dir / "tensorboard")))
    if cfg.logging.mlflow_experiment:
        from composer.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name=cfg.logging.mlflow_experiment))
    return loggers


def build_trainer(cfg: RunConfig):
    """Everything a run needs, assembled into a Composer Trainer (each part by its own builder)."""
    from composer import Trainer
    from composer.utils import reproducibility

    from ettin.composer_model import EttinComposerModel
    from ettin.parallel import parallelize

    run_dir = Path(cfg.run_dir)
    device, rank, world = start_distributed()
    reproducibility.seed_all(cfg.seed)
    tokenizer_dir, tokenizer = run_tokenizer(cfg)
    model, info = start_model(cfg, tokenizer, tokenizer_dir)
    parallel = parallelize(model, cfg, device)  # activation checkpointing -> compile -> FSDP
    composer_model = EttinComposerModel(model)
    train, evaluators = build_data(cfg, tokenizer, list(composer_model.eval_metrics), rank, world)
    parallel.prepare_dataloaders([train, *(e.dataloader for e in evaluators)])
    optimizer, scheduler = build_optimization(cfg, model)
    callbacks = [
        *build_callbacks(cfg, info),
        *export_callbacks(cfg, info, tokenizer_dir),
        *parallel.callbacks,
    ]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    save_args, resume = _checkpoint_args(cfg, run_dir, rank)
    if resume is not None:
        check_resumed_window(resume, model.args)
    trainer = Trainer(
        run_name=cfg.run_name,
        model=composer_model,
        train_dataloader=train,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        precision=run_precision(cfg, device),
        device=device,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        accumulate_train_batch_on_tokens=True,
        parallelism_config=parallel.parallelism_config,
        compile_config=None,  # cfg.compile: the blocks are compiled by `parallelize`
        seed=cfg.seed,
        deterministic_mode=cfg.deterministic,  # torch deterministic algorithms (+ flash's flag)
        callbacks=callbacks,
        loggers=_loggers(cfg, run_dir),
        **save_args,
        progress_bar=cfg.logging.progress_bar,
        log_to_console=not cfg.logging.progress_bar,
        console_log_interval=cfg.logging.console_interval,
        python_log_level=None,
        spin_dataloaders=False,
    )
    trainer.ettin_resume = resume  # what autoresume found (read by `train`)
    return trainer


def start_distributed() -> tuple[Any, int, int]:
    """(the Trainer's Composer device, global rank, world size), with the process group started.

    The one device object is shared with the FSDP microbatch split (`ettin.parallel`), so no
    other `DeviceGPU` is built (each one resets TF32 and `set_device`).
    """
    from composer.utils import dist, get_device

    kind = "gpu" if torch.cuda.is_available() else "cpu"
    dist.initialize_dist(kind)
    return get_device(kind), dist.get_global_rank(), dist.get_world_size()


def run_tokenizer(cfg: RunConfig) -> tuple[str, Any]:
    """(its folder, the tokenizer) of the run: `cfg.tokenizer`, else the Ettin tokenizer."""
    from ettin.tokenizer import default_tokenizer_dir, load_tokenizer

    tokenizer_dir = cfg.tokenizer or str(default_tokenizer_dir())
    return tokenizer_dir, load_tokenizer(tokenizer_dir)


def start_model(cfg: RunConfig, tokenizer: Any, tokenizer_dir: str) -> tuple[Any, CheckpointInfo]:
    """The model the run starts from (fresh, or `init_from`'s weights) and what its checkpoints
    will say about it: model args, objective, tokenizer fingerprint, length and lineage."""
    from ettin.tokenizer import tokenizer_fingerprint

    model = build_model(cfg, tokenizer)
    info = CheckpointInfo(
        model_args=model.args,
        objective=cfg.objective.name,
        tokenizer={"path": str(tokenizer_dir), **tokenizer_fingerprint(tokenizer)},
        max_seq_len=cfg.data.max_seq_len,
    )
    objectives = [cfg.objective.name]  # this run's objective and its ancestors', oldest first
    if cfg.init_from:
        source = init_from_checkpoint(model, cfg.init_from)
        objectives = [*source.lineage.get("objectives", [source.objective]), cfg.objective.name]
        info.lineage = {
            "init_from": str(cfg.init_from),
            "init_digest": state_digest(model.state_dict()),
        }
    info.lineage["objectives"] = objectives
    return model, info


def build_data(
    cfg: RunConfig, tokenizer: Any, metric_names: list[str], rank: int, world: int
) -> tuple[Any, list[Any]]:
    """(the train DataSpec, the evaluators): this rank's slice of the run's data order."""
    from composer.core import Evaluator

    from ettin.data import build_dataloader

    train = build_dataloader(
        cfg.data,
        cfg.objective,
        tokenizer,
        split=cfg.data.train_split,
        global_batch_size=cfg.global_train_batch_size,
        microbatch_size=cfg.device_train_microbatch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        run_dir=Path(
            cfg.run_dir
        ),  # its skip_steps.json (a loss-spike rewind) joins data.skip_steps
    )
    if not cfg.data.eval_split:
        return train, []
    eval_spec = build_dataloader(
        cfg.data,
        cfg.objective,
        tokenizer,
        split=cfg.data.eval_split,
        global_batch_size=cfg.global_eval_batch_size,
        microbatch_size=cfg.global_eval_batch_size // world,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
    )
    evaluator = Evaluator(
        label="val",
        dataloader=eval_spec,
        metric_names=metric_names,
        subset_num_batches=cfg.eval_subset_num_batches,
        device_eval_microbatch_size=cfg.device_train_microbatch_size,
    )
    return train, [evaluator]


def build_optimization(cfg: RunConfig, model: Any) -> tuple[Any, Any]:
    """(StableAdamW over the reference's parameter groups, the warmup-stable-decay schedule)."""
    from ettin.optim import WarmupStableDecay, build_optimizer

    return build_optimizer(model, cfg.optim), WarmupStableDecay(cfg.scheduler)


def build_callbacks(cfg: RunConfig, info: CheckpointInfo) -> list[Any]:
    """The run's callbacks: its metadata in every checkpoint, the monitors, the guards."""
    from composer.callbacks import LRMonitor

    from ettin.callbacks import DataOrderRecorder, GradNorm, PackingEfficiency, StepRNG, Throughput
    from ettin.flops import flops_per_token

    run_dir, c = Path(cfg.run_dir), cfg.callbacks
    mlm = cfg.objective.name == "mlm"
    callbacks: list[Any] = [
        RunInfo(info),
        LRMonitor(),
        Throughput(
            window=c.speed_window,
            flops_per_token_fn=functools.partial(
                flops_per_token,
                info.model_args,
                mlm_probability=cfg.objective.mlm_probability if mlm else 1.0,
            ),
        ),
        PackingEfficiency(interval=c.speed_window),
        StepRNG(cfg.seed),  # dropout as a function of (seed, step, rank, microbatch): exact resume
    ]
    if c.grad_norm_interval > 0:
        callbacks.append(GradNorm(interval=c.grad_norm_interval))
    if c.record_order:
        callbacks.append(DataOrderRecorder(run_dir / "data_order.parquet"))
    if c.loss_spike_window > 0:
        from ettin.callbacks.loss_spike import LossSpikeGuard

        callbacks.append(
            LossSpikeGuard(c.loss_spike_window, c.loss_spike_ratio, c.loss_spike_action, run_dir)
        )
    if cfg.save_step0:  # the untrained model as checkpoint ep0-ba0 (a revision step0)
        from ettin.callbacks.loss_spike import SaveStep0

        callbacks.append(SaveStep0())
    return callbacks


def export_callbacks(cfg: RunConfig, info: CheckpointInfo, tokenizer_dir: str) -> list[Any]:
    """The HF export at the end of the run (`callbacks.export_hf`), or none, with the reason.

    A decoder whose local and global RoPE thetas differ is not exported: HF's ModernBertDecoder
    (transformers 4.57) applies the global theta in every layer and would compute another model.
    """
    from ettin.callbacks import HFExport

    args = info.model_args
    if not cfg.callbacks.export_hf:
        return []
    if args.causal and args.local_rope_theta != args.global_rope_theta:
        log.warning(
            "no HF export at the end of %s: its decoder has local_rope_theta=%g and "
            "global_rope_theta=%g, and HF ModernBertDecoder (transformers 4.57) applies the "
            "global theta in every layer; export anyway with `ettin export CHECKPOINT OUT "
            "--allow-rope-mismatch`",
            cfg.run_name,
            args.local_rope_theta,
            args.global_rope_theta,
        )
        return []
    export = HFExport(
        Path(cfg.run_dir) / "hf",
        tokenizer_dir=tokenizer_dir,
        max_seq_len=cfg.data.max_seq_len,
        objectives=info.lineage["objectives"],
    )
    return [export]


def run_precision(cfg: RunConfig, device: Any) -> str:
    """`cfg.precision`, with "auto" as amp_bf16 on a GPU and fp32 on the CPU."""
    if cfg.precision != "auto":
        return cfg.precision
    return "amp_bf16" if device.name == "gpu" else "fp32"


def _checkpoint_args(cfg: RunConfig, run_dir: Path, rank: int) -> tuple[dict, ResumePoint | None]:
    """The Trainer's checkpoint and autoresume arguments, after making the folder safe to resume.

    With autoresume, rank 0 first moves partial or unreadable checkpoint files (a kill or a full
    disk while saving) into `checkpoints/incomplete/` and points `latest-rank0.pt` at the newest
    complete checkpoint by step (`ettin.checkpoint.prepare_resume`); the other ranks wait.
    """
    from composer.utils import dist

    folder = run_dir / "checkpoints"
    resume = None
    if cfg.autoresume:
        if rank == 0:
            resume = prepare_resume(folder)
        dist.barrier()
    args = {
        "save_folder": str(folder),
        "save_filename": CHECKPOINT_FILENAME,
        "save_latest_filename": LATEST_FILENAME,
        "save_interval": cfg.save_interval,
        "save_num_checkpoints_to_keep": cfg.save_num_checkpoints_to_keep,
        "save_overwrite": False,
        "autoresume": cfg.autoresume,
    }
    return args, resume


def check_resumed_window(resume: ResumePoint, args: Any) -> None:
    """Refuse to autoresume a checkpoint trained with another decoder window than the run's.

    A reference decoder continued with `ettin import --resume-into` trains with the reference's
    window (`model.causal_window=reference`); resuming it with the HF rule would silently change
    what every local layer sees.
    """
    if not resume.model_args or resume.checkpoint is None:  # nothing recorded (sharded)
        return
    theirs = resume.model_args.get("causal_window", "hf")  # older checkpoints: HF's rule
    if args.causal and theirs != args.causal_window:
        raise ConfigError(
            f"{resume.checkpoint} was trained with model.causal_window={theirs} but this run says "
            f"model.causal_window={args.causal_window}; resume with model.causal_window={theirs}"
        )


def _finished(trainer: Any) -> bool:
    state = trainer.state
    limit = state.max_duration
    return limit is not None and state.timestamp.get(limit.unit) >= limit


def train(cfg: RunConfig) -> Any:
    """Run (or resume) one phase to its end; returns the trainer's final state.

    A run whose newest checkpoint already reached `max_duration` is not trained again: it says
    so (and where its outputs are) and returns.
    """
    from composer.utils import dist

    trainer = build_trainer(cfg)
    run_dir = Path(cfg.run_dir)
    rank0 = dist.get_global_rank() == 0
    resume = getattr(trainer, "ettin_resume", None)
    if _finished(trainer):
        if rank0:
            done = run_dir / "DONE"
            if not done.exists():
                done.write_text(f"{trainer.state.timestamp.batch.value} batches\n")
            print(
                f"run {cfg.run_name} is already finished: {trainer.state.timestamp.batch.value} "
                f"batches, max_duration={cfg.max_duration} (checkpoint "
                f"{resume.checkpoint if resume else run_dir / 'checkpoints'}). Outputs: {run_dir} "
                f"(checkpoints/, metrics.jsonl, data_order.parquet, hf/). To train on, raise "
                f"max_duration; to start over, use another run_name or run_dir."
            )
        trainer.close()
        return trainer.state
    if rank0 and resume is not None and resume.checkpoint is not None:
        moved = (
            f"; moved {len(resume.moved)} incomplete file(s) to {resume.moved[0].parent}"
            if resume.moved
            else ""
        )
        print(
            f"resuming {cfg.run_name} from {resume.checkpoint} (batch {resume.batch}){moved}",
            flush=True,
        )
    trainer.fit()
    trainer.close()
    guard = next((c for c in trainer.state.callbacks if getattr(c, "triggered", None)), None)
    if guard is not None:  # stopped by the loss-spike guard: not finished, no DONE
        from ettin.callbacks.loss_spike import LossSpikeError

        raise LossSpikeError(guard.message())
    if dist.get_global_rank() == 0:
        # The recipe runner skips stages that have this marker.
        (Path(cfg.run_dir) / "DONE").write_text(f"{trainer.state.timestamp.batch.value} batches\n")
    return trainer.state


def main(argv: list[str]) -> None:
    """`composer src/main.py yamls/<run>.yaml [key=value ...] [--debug]`."""
    from ettin.errors import debugging, one_line_errors

    debug = debugging(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        print(
            "Overrides use Hydra syntax: model.size=150m, objective=clm, data.path=data/sotu/pretrain"
        )
        print("Errors print one line; --debug (or ETTIN_DEBUG=1) shows the traceback.")
        return
    with one_line_errors("ettin train", debug):
        train(load_config(argv[0], argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
