"""`parallelize`: a run's activation checkpointing, compile and FSDP settings applied to its model.

The order is torchtitan's and matters: activation checkpointing wraps each block, compile then
traces the wrapped block (dynamo traces the checkpoint), and FSDP last makes each (wrapped,
compiled) block one unit. FSDP itself is performed by Composer inside `Trainer` (an
`FSDP2Config` as `parallelism_config`); what it needs beforehand is prepared here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ettin.config import RunConfig
from ettin.model import EttinModel

__all__ = ["Parallelized", "parallelize"]


@dataclass
class Parallelized:
    """What the Trainer needs from `parallelize`: its parallelism config and callbacks."""

    parallelism_config: dict[str, Any] | None = None
    """Composer's `parallelism_config` ({"fsdp": FSDP2Config}), None without FSDP."""
    callbacks: list[Any] = field(default_factory=list)
    """Callbacks the setting needs (FSDP: gloo gradient averaging, the update-clip monitor)."""
    microbatch_size: int = 0
    """`device_train_microbatch_size`: the size every rank's microbatch count is taken at."""
    device: Any = None
    """The Trainer's Composer device (the microbatch count is all-reduced on it)."""

    def prepare_dataloaders(self, specs: Iterable[Any]) -> None:
        """Under FSDP, make every rank run as many microbatches per batch as the others.

        Each forward all-gathers every block, so all ranks must run the same number of them;
        packing (rows per rank differ) and evaluation tails break that. `specs` are Composer
        DataSpecs (train and eval); their `split_batch` is wrapped in place.
        """
        if self.parallelism_config is None:
            return
        from ettin.parallel.fsdp import equal_microbatch_split

        for spec in specs:
            spec.split_batch = equal_microbatch_split(
                spec.split_batch, self.microbatch_size, self.device
            )


def parallelize(model: EttinModel, cfg: RunConfig, device: Any) -> Parallelized:
    """Activation checkpointing, then torch.compile, then FSDP preparation, as `cfg` asks.

    The model is changed in place (blocks wrapped and compiled, the FSDP wrap policy set on it);
    `device` is the Trainer's Composer device.
    """
    if cfg.activation_checkpointing:  # first: compile traces the checkpointed block
        from ettin.parallel.fsdp import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if cfg.compile:  # per block, in place (see ettin.parallel.compile); before FSDP
        from ettin.parallel.compile import compile_model

        compile_model(model)
    if cfg.parallelism != "fsdp":
        return Parallelized()
    from ettin.parallel.fsdp import gloo_average_callback, prepare_fsdp, update_clip_callback

    config = prepare_fsdp(
        model, param_dtype=cfg.fsdp_param_dtype, reduce_dtype=cfg.fsdp_reduce_dtype
    )
    return Parallelized(
        parallelism_config=config,
        callbacks=[
            gloo_average_callback(),  # CPU runs: gloo's AVG reduce-scatter sums
            update_clip_callback(),  # optim/update_rms_max, optim/update_clipped
        ],
        microbatch_size=cfg.device_train_microbatch_size,
        device=device,
    )
