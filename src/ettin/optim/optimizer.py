"""StableAdamW with fully LR-decoupled weight decay, and the two parameter groups it trains.

We use torch-optimi's `StableAdamW` as is: its update (optimi 0.3.3, `stableadamw.py`) is exactly
the reference recipe's (debiased betas, per-tensor update clipping by the RMS of g²/max(v, ε²),
weight decay scaled by η/η_max). `tests/test_optim.py` checks it against a hand-written copy of
that algorithm. See docs/architecture.md, "Optimiser, schedules and callbacks".
"""

from __future__ import annotations

from typing import Any

import torch
from optimi import StableAdamW
from torch import nn

from ettin.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: [0] no decay (norms, biases, any ndim <= 1), [1] decay (2-D weights).

    `named_parameters()` yields a shared tensor once, so the tied embedding/decoder weight is in
    group 1 exactly once. Frozen parameters (requires_grad=False) are left out.
    """
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> StableAdamW:
    """StableAdamW over `param_groups(model)`, weight decay scaled by lr / peak lr (max_lr).

    `kahan_sum=None` turns Kahan summation on only for bf16/fp16 parameters (off under amp_bf16,
    whose master weights are fp32). Triton kernels on CUDA machines (faster than foreach, which
    optimi 0.3 deprecates); a per-tensor loop on CPU. The choice is explicit because optimi's own
    default picks Triton for a group whose parameters all lack gradients, which fails on CPU.
    """
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {cfg.betas}")
    return StableAdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.peak_lr,  # lr x lr_scale (half in the decay and cross phases)
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        decouple_lr=True,
        max_lr=cfg.peak_lr,
        kahan_sum=None,
        triton=torch.cuda.is_available(),
    )
