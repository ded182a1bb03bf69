"""Fully sharded data parallelism (FSDP2, `fully_shard`) and activation checkpointing.

Composer 0.32.1 drives FSDP2 (`composer.distributed.prepare_distributed.parallelize_composer_model`)
when the trainer gets an `FSDP2Config`: it calls `fully_shard` bottom-up on every module that the
wrap policy names, then on the `EttinModel` itself (the FSDP root: embeddings, final norm, head and
the tied decoder), swaps the optimiser's parameters for the sharded DTensors, and saves and loads
sharded checkpoints with torch.distributed.checkpoint. What this module adds, without the model
knowing anything about FSDP:

- the wrap policy: one FSDP unit per transformer block (`model.model.layers[i]`, whatever wraps it:
  a checkpoint wrapper, a compiled block), set as the `fsdp_wrap_fn` attribute that Composer reads;
  the last block keeps its parameters gathered after the forward (it is the first one the backward
  needs);
- `EttinOutput` registered as a pytree node: FSDP2 finds the tensors of a module's output with
  `tree_flatten` to hook its pre-backward (and the post-backward callback that reduce-scatters the
  gradients); a plain dataclass is one opaque leaf, so without this the loss never triggers the
  gradient reduction;
- the precision policy: gradients are reduce-scattered in fp32 and parameters are gathered in fp32
  by default (exactly DDP's numerics under fp32 and amp_bf16; autocast still runs the matmuls in
  bf16); `fsdp_param_dtype=bf16` halves the all-gathers, `fsdp_reduce_dtype=bf16` the
  reduce-scatters (the reference's `mixed_precision: PURE`);
- `equal_microbatch_split`: every rank must run the same number of forward/backward passes under
  FSDP (each one all-gathers every block), which packing (rows per rank differ) and uneven
  evaluation tails break; the split makes the counts equal.

See docs/architecture.md, "The GPU path".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register_output_pytree() -> None:
    """Make `EttinOutput` a pytree node (idempotent) so FSDP2 hooks the loss for the backward."""
    import torch.utils._pytree as pytree

    from ettin.model import EttinOutput

    if EttinOutput not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(EttinOutput)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an `EttinModel` (possibly wrapped), in order."""
    return model.model.layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward (torch's non-reentrant checkpoint).

    Each `model.model.layers[i]` is replaced by a `CheckpointWrapper` around it. Parameter names
    gain a `_checkpoint_wrapped_module.` segment, but `state_dict()` (and torch.distributed's
    checkpoint state dicts) strip it, so checkpoints are the same with or without checkpointing.
    Call it before torch.compile and before FSDP (the order torchtitan uses).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    layers = blocks(model)
    for i, block in enumerate(layers):
        if not isinstance(block, CheckpointWrapper):
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def fsdp_wrap_fn(model: nn.Module) -> Callable[[nn.Module], bool | dict[str, Any]]:
    """Composer's wrap policy for `model`: each block is its own FSDP unit (the root is implicit)."""
    layers = list(blocks(model))
    last = layers[-1] if layers else None
    ids = {id(b) for b in layers}

    def wrap(module: nn.Module) -> bool | dict[str, Any]:
        if id(module) not in ids:
            return False
        # The backward starts with the last block: resharding it after the forward only to
        # all-gather it again at once is wasted traffic.
        return {"reshard_after_forward": False} if module is last else True

    return wrap


def fsdp_config(param_dtype: str = "fp32", reduce_dtype: str = "fp32"):
    """The Composer `FSDP2Config`: full sharding, sharded checkpoints, the precision policy."""
    import warnings

    from composer.utils.parallelism import FSDP2Config

    for name, value in (("fsdp_param_dtype", param_dtype), ("fsdp_reduce_dtype", reduce_dtype)):
        if value not in _DTYPES:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(_DTYPES)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        return FSDP2Config(
            reshard_after_forward=True,
            state_dict_type="sharded",
            mixed_precision={"param_dtype": param_dtype, "reduce_dtype": reduce_dtype},
        )


def prepare_fsdp(model: nn.Module, *, param_dtype: str = "fp32", reduce_dtype: str = "fp32"):
    """Everything FSDP needs before the Trainer is built; returns its `parallelism_config`.

    Sets the wrap policy on the model instance (Composer reads `fsdp_wrap_fn` from the direct child
    of the ComposerModel) and registers the output pytree. Composer then shards in `Trainer`.
    """
    register_output_pytree()
    model.fsdp_wrap_fn = fsdp_wrap_fn(model)
    return {"fsdp": fsdp_config(param_dtype, reduce_dtype)}


# ---------------------------------------------------------------- gloo (CPU) gradient averaging


def _reduce_scatter_avg_sums(group: Any = None) -> bool:
    """True when this backend's reduce_scatter with ReduceOp.AVG returns the sum (gloo in torch 2.7).

    FSDP2 reduce-scatters fp32/bf16 gradients with AVG; gloo silently sums instead, so the
    gradients of a CPU run come out `world_size` times too large (Adam hides most of it, not the
    epsilon). One tiny collective tells.
    """
    import torch.distributed as tdist

    world = tdist.get_world_size(group)
    probe = torch.ones(world, dtype=torch.float32)
    out = torch.empty(1, dtype=torch.float32)
    tdist.reduce_scatter_tensor(out, probe, op=tdist.ReduceOp.AVG, group=group)
    return world > 1 and abs(out.item() - world) < 0.5


def average_gradients_on_gloo(model: nn.Module) -> bool:
    """Make FSDP2's reduce-scatter an average on a CPU (gloo) run; returns whether it had to.

    Each FSDP unit gets an all-reduce hook (run right after its reduce-scatter) dividing the
    reduced gradient shard by the world size. NCCL runs are left alone.
    """
    import torch.distributed as tdist
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or not tdist.is_initialized() or tdist.get_backend() != "gloo":
        return False
    if not _reduce_scatter_avg_sums():
        return False
    world = float(tdist.get_world_size())
    for unit in units:
        unit.set_all_reduce_hook(lambda grad: grad.div_(world))
    log.info("gloo reduce_scatter(AVG) sums: FSDP gradients are divided by %d", int(world))
    return True


def gloo_average_callback():
    """A Composer callback that calls `average_gradients_on_gloo` on the sharded model at FIT_START."""
    from composer.core import Callback

    class GlooGradientAverage(Callback):
        def fit_start(self, state, logger) -> None:
            del logger
            average_gradients_on_gloo(state.model)

    return GlooGradientAverage()


def update_clip_callback():
    """A Composer callback logging the sharded StableAdamW's update clipping after each step.

    `optim/update_rms_max`: the largest r_p = sqrt(mean(g²/max(v, ε²))) of the step;
    `optim/update_clipped`: how many parameters had r_p > 1 (their learning rate was divided by
    r_p). Only the sharded step computes r_p on the host; nothing is logged otherwise.
    """
    from composer.core import Callback

    class UpdateClipMonitor(Callback):
        def batch_end(self, state, logger) -> None:
            rms = getattr(state.optimizers[0], "update_rms", None)
            if rms:
                logger.log_metrics(
                    {
                        "optim/update_rms_max": max(rms),
                        "optim/update_clipped": sum(r > 1.0 for r in rms),
                    }
                )

    return UpdateClipMonitor()


# ---------------------------------------------------------------- equal microbatch counts


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def _slice(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in batch.items()}


def _empty_microbatch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row holding one real token and nothing to score: no loss term, exactly zero gradient.

    The token (a copy of the batch's first, e.g. [CLS]) is a sequence of its own: CLM has no next
    token to predict and MLM labels are all -100, so it adds 0 to every loss-token count.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in batch.items():
        if k == "input_ids":
            out[k] = v[:1, :1].clone()
        elif k == "attention_mask":
            out[k] = torch.ones_like(v[:1, :1])
        elif k == "labels":
            out[k] = torch.full_like(v[:1, :1], -100)
        elif k in ("sample_id", "sample_ids"):
            out[k] = torch.full_like(v[:1, :1] if v.ndim > 1 else v[:1], -1)
        else:
            out[k] = v[:1].clone()
    return out


def split_into(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """`batch` as exactly `k` microbatches of near-equal rows (padded with empty ones if needed)."""
    rows = _rows(batch)
    parts = min(k, rows)
    bounds = [rows * i // parts for i in range(parts + 1)]
    out = [_slice(batch, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    out += [_empty_microbatch(batch) for _ in range(k - parts)]
    return out


def equal_microbatch_split(
    split_batch: Callable[[Any, int], Sequence], microbatch_size: int, device: Any
) -> Callable[[Any, int], Sequence]:
    """Wrap a DataSpec's `split_batch` so every rank gets the same number of microbatches.

    The most microbatches any rank needs at `microbatch_size` (one all-reduce of a scalar per
    batch) is the count for all: a rank that would have fewer re-splits its rows into that many
    near-equal microbatches (none larger than `microbatch_size`), padded with empty ones only when
    it has fewer rows than microbatches. Gradients are unchanged: Composer weights each microbatch
    by its loss tokens. Composer also calls `split_batch` on one rank alone, to drop a padding
    sample from the last evaluation microbatch, with a smaller size: such calls are passed through
    without the collective.

    Composer 0.32 splits the batch *before* moving it to the device, so the batch's tensors are
    on the host: the count goes to `device` (the Trainer's Composer device) for the all-reduce
    (NCCL refuses host tensors; gloo cannot tell).
    """
    from composer.utils import dist

    def split(batch: Any, size: int) -> Sequence:
        parts = split_batch(batch, size)
        if size != microbatch_size or dist.get_world_size() == 1:
            return parts
        most = device.tensor_to_device(torch.tensor([len(parts)], dtype=torch.int64))
        dist.all_reduce(most, reduce_operation="MAX")
        k = int(most.item())
        if k == len(parts):
            return parts
        return split_into(batch, k)

    return split
