"""L2 norm of the gradients of all parameters, and of each optimiser parameter group.

The reference logged the norm of the last parameter group only (recipe §8 B3). This callback
reads every group of the optimiser at `Event.AFTER_TRAIN_BATCH`: after the backward pass of the
last microbatch (gradients accumulated, all-reduced by DDP and unscaled), before
`optimizer.step()`. Composer 0.32 has no separate BEFORE_OPTIMIZER_STEP event.
"""

from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def group_grad_norms(
    param_groups: list[dict], *, sharded: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(total L2 norm, [L2 norm of each group]) of the gradients in `param_groups`.

    Parameters without a gradient count as zero. With `sharded=True` (FSDP full sharding, each
    element on one rank) the squared sums are all-reduced so every rank gets the global norms.
    """
    squares = []
    for group in param_groups:
        total = None
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2 DTensor
            sq = grad.detach().float().pow(2).sum()
            total = sq if total is None else total + sq
        squares.append(total)
    # The parameters' device, not a guess: under sharding a rank may hold no gradient of a group,
    # and the all_reduce below must still run on the training device (NCCL refuses host tensors).
    device = next(
        (p.device for group in param_groups for p in group["params"]), torch.device("cpu")
    )
    stacked = torch.stack([s if s is not None else torch.zeros((), device=device) for s in squares])
    if sharded:
        dist.all_reduce(stacked, reduce_operation="SUM")
    return stacked.sum().sqrt(), list(stacked.sqrt().unbind())


class GradNorm(Callback):
    """Every `interval` batches (from the first), logs grad_norm/total and grad_norm/group{i}.

    The total covers all parameters of the optimiser once each (a tied weight is one parameter).
    `interval=0` disables the callback.
    """

    def __init__(self, interval: int = 100) -> None:
        if interval < 0:
            raise ValueError(f"GradNorm interval must be >= 0, got {interval}")
        self.interval = interval

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if self.interval == 0 or int(state.timestamp.batch) % self.interval != 0:
            return
        optimizer = state.optimizers[0]
        total, groups = group_grad_norms(optimizer.param_groups, sharded=state.fsdp_enabled)
        metrics = {"grad_norm/total": total.item()}
        metrics.update({f"grad_norm/group{i}": g.item() for i, g in enumerate(groups)})
        logger.log_metrics(metrics)
