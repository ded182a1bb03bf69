"""Build a Composer `Trainer` from a validated `RunConfig`; nothing else lives here."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from ettin.checkpoint import CheckpointInfo, RunInfo, load_weights, read_checkpoint, state_digest
from ettin.config import RunConfig, load_config, to_yaml

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
        attn_out_dropout=cfg.model.attn_out_dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    check_tokenizer(tokenizer, args)
    return EttinModel(args)


def init_from_checkpoint(model, path: str) -> CheckpointInfo:
    """Load weights only (phase transition or cross-objective); time and optimiser start fresh."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"init_from={path} does not exist: run the previous stage first "
            "(or `ettin recipe` to run the chain), or point init_from at its checkpoint"
        )
    state, info = read_checkpoint(path)
    load_weights(model, state, source=path)
    if info.model_args.causal != model.args.causal:
        log.info(
            "cross-objective start: %s weights -> %s",
            info.objective,
            "clm" if model.args.causal else "mlm",
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
    """Everything a run needs, assembled into a Composer Trainer."""
    from composer import Trainer
    from composer.callbacks import LRMonitor
    from composer.core import Evaluator
    from composer.utils import dist, reproducibility

    from ettin.callbacks import DataOrderRecorder, GradNorm, HFExport, PackingEfficiency, Throughput
    from ettin.composer_model import EttinComposerModel
    from ettin.data import build_dataloader
    from ettin.flops import flops_per_token
    from ettin.optim import build_optimizer, build_scheduler
    from ettin.prep.tokenizer import default_tokenizer_dir, load_tokenizer, tokenizer_fingerprint

    run_dir = Path(cfg.run_dir)
    on_gpu = torch.cuda.is_available()
    dist.initialize_dist("gpu" if on_gpu else "cpu")
    world, rank = dist.get_world_size(), dist.get_global_rank()
    if cfg.global_train_batch_size % world:
        raise ValueError(
            f"global_train_batch_size={cfg.global_train_batch_size} is not divisible by the "
            f"{world} ranks; choose a multiple of {world}"
        )
    reproducibility.seed_all(cfg.seed)

    tokenizer_dir = cfg.tokenizer or str(default_tokenizer_dir())
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(cfg, tokenizer)
    info = CheckpointInfo(
        model_args=model.args,
        objective=cfg.objective.name,
        tokenizer={"path": str(tokenizer_dir), **tokenizer_fingerprint(tokenizer)},
    )
    if cfg.init_from:
        init_from_checkpoint(model, cfg.init_from)
        info.lineage = {
            "init_from": str(cfg.init_from),
            "init_digest": state_digest(model.state_dict()),
        }

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
    )
    composer_model = EttinComposerModel(model)
    evaluators = []
    if cfg.data.eval_split:
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
        evaluators.append(
            Evaluator(
                label="val",
                dataloader=eval_spec,
                metric_names=list(composer_model.eval_metrics),
                subset_num_batches=cfg.eval_subset_num_batches,
                device_eval_microbatch_size=cfg.device_train_microbatch_size,
            )
        )

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(cfg.scheduler)

    callbacks: list = [
        RunInfo(info),
        LRMonitor(),
        Throughput(
            window=cfg.callbacks.speed_window,
            flops_per_token_fn=functools.partial(
                flops_per_token,
                model.args,
                mlm_probability=cfg.objective.mlm_probability
                if cfg.objective.name == "mlm"
                else 1.0,
            ),
        ),
        PackingEfficiency(interval=cfg.callbacks.speed_window),
    ]
    if cfg.callbacks.grad_norm_interval > 0:
        callbacks.append(GradNorm(interval=cfg.callbacks.grad_norm_interval))
    if cfg.callbacks.record_order:
        callbacks.append(DataOrderRecorder(run_dir / "data_order.parquet"))
    if cfg.callbacks.export_hf:
        callbacks.append(HFExport(run_dir / "hf", tokenizer_dir=tokenizer_dir))

    precision = cfg.precision if cfg.precision != "auto" else ("amp_bf16" if on_gpu else "fp32")
    parallelism = None
    if cfg.parallelism == "fsdp":
        parallelism = {
            "fsdp": {
                "sharding_strategy": "FULL_SHARD",
                "mixed_precision": "PURE",
                "use_orig_params": True,
            }
        }
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    return Trainer(
        run_name=cfg.run_name,
        model=composer_model,
        train_dataloader=train,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        precision=precision,
        device="gpu" if on_gpu else "cpu",
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        accumulate_train_batch_on_tokens=True,
        parallelism_config=parallelism,
        compile_config={} if cfg.compile else None,
        seed=cfg.seed,
        callbacks=callbacks,
        loggers=_loggers(cfg, run_dir),
        save_folder=str(run_dir / "checkpoints"),
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=False,
        autoresume=cfg.autoresume,
        progress_bar=cfg.logging.progress_bar,
        log_to_console=not cfg.logging.progress_bar,
        console_log_interval=cfg.logging.console_interval,
        python_log_level=None,
        spin_dataloaders=False,
    )


def train(cfg: RunConfig) -> Any:
    """Run (or resume) one phase to its end; returns the trainer's final state."""
    from composer.utils import dist

    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    if dist.get_global_rank() == 0:
        # The recipe runner skips stages that have this marker.
        (Path(cfg.run_dir) / "DONE").write_text(f"{trainer.state.timestamp.batch.value} batches\n")
    return trainer.state


def main(argv: list[str]) -> None:
    """`composer src/main.py yamls/<run>.yaml [key=value ...]`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        print(
            "Overrides use Hydra syntax: model.size=150m, objective=clm, data.path=data/sotu/pretrain"
        )
        return
    cfg = load_config(argv[0], argv[1:])
    train(cfg)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
