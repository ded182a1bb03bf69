"""StableAdamW with fully LR-decoupled weight decay, and the two parameter groups it trains.

We use torch-optimi's `StableAdamW`: its update (optimi 0.3.3, `stableadamw.py`) is exactly the
reference recipe's (debiased betas, per-tensor update clipping by the RMS of g²/max(v, ε²), weight
decay scaled by η/η_max). `tests/test_optim.py` checks it against a hand-written copy of that
algorithm. Our `StableAdamW` subclass runs optimi's own step unchanged (Triton on CUDA) unless the
parameters are sharded (FSDP2 DTensors): then the per-tensor RMS must still be over the *whole*
tensor, as in the unsharded reference, not over each rank's shard, so the sums of g²/max(v, ε²)
are computed per shard and all-reduced once per step for all parameters. See
docs/architecture.md, "Optimiser, schedules and callbacks" and "The GPU path".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
from optimi import StableAdamW as OptimiStableAdamW
from optimi.utils import debias_beta
from torch import Tensor, nn

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


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_group(p: Tensor) -> Any:
    """The process group a DTensor parameter is sharded over (None: not sharded)."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return None
    if mesh.ndim != 1:
        raise NotImplementedError(
            "StableAdamW's sharded update clipping supports a 1-D device mesh (FULL_SHARD), "
            f"got a {mesh.ndim}-D mesh"
        )
    return mesh.get_group()


class StableAdamW(OptimiStableAdamW):
    """optimi's StableAdamW; with sharded (DTensor) parameters, update clipping over whole tensors.

    Unsharded (single device, DDP): `step()` is optimi's, bit for bit, kernel choice included.
    Sharded: per parameter p, each rank sums g²/max(v, ε²) over its shard; one all-reduce of the
    stacked sums (all parameters, all groups) gives the full sums, and
    r_p = sqrt(sum_p / p.numel()) uses the full element count, so η_p = η / max(1, r_p) is the
    unsharded value on every rank (up to summation order). Moments, weight decay and the Adam step
    are elementwise and run on the local shards (Kahan summation for bf16/fp16 parameters, as
    optimi). The optimiser state stays DTensor, so sharded checkpoints save and load it.

    After a sharded step, `update_rms` holds the r_p of the parameters that had gradients (group
    order) on the host; it is None after an unsharded step.
    """

    update_rms: list[float] | None = None

    def _sharded(self) -> bool:
        return any(
            hasattr(p, "device_mesh") and hasattr(p, "to_local")
            for group in self.param_groups
            for p in group["params"]
        )

    @torch.no_grad()
    def step(self, closure=None, param: Tensor | None = None):
        if param is not None or not self._sharded():
            self.update_rms = None
            return super().step(closure=closure, param=param)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sharded_step()
        return loss

    def _sharded_step(self) -> None:
        work = []  # (group, param, local tensors) for every parameter with a gradient
        for group in self.param_groups:
            if group["gradient_release"]:
                raise NotImplementedError("gradient release is not supported with sharded params")
            if not group["setup"]:
                group["setup"] = True
                group["step"] = torch.tensor(0, dtype=torch.int32)
            group["triton"] = False  # the sharded path is plain torch; record it for the state
            group["step"].add_(1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                self._init_state(group, state, p)
                work.append((group, p, state))
        if not work:
            self.update_rms = []
            return
        # Local sums of g²/max(v, ε²) after the moment update, one slot per parameter.
        sums, numels, shards = [], [], []
        for group, p, state in work:
            step = int(group["step"].item())
            beta1_comp = 1 - debias_beta(group["beta1"], step)
            beta2_hat = debias_beta(group["beta2"], step)
            g, m, v = _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            m.lerp_(g, weight=beta1_comp)
            v.mul_(beta2_hat).addcmul_(g, g, value=1 - beta2_hat)
            sums.append(g.pow(2).div_(v.maximum(state["eps_sq"])).sum(dtype=torch.float32))
            numels.append(p.numel())  # the full tensor's element count
            shards.append((group, _local(p), g, m, v, state))
        total = torch.stack(sums)
        groups = {id(g): g for g in (_shard_group(p) for _, p, _ in work) if g is not None}
        if len(groups) > 1:
            raise NotImplementedError("parameters sharded over different process groups")
        if groups and tdist.is_initialized():
            tdist.all_reduce(total, op=tdist.ReduceOp.SUM, group=next(iter(groups.values())))
        rms = (total / torch.tensor(numels, dtype=torch.float32, device=total.device)).sqrt()
        self.update_rms = rms.tolist()  # the one host sync of the step
        for (group, p, g, m, v, state), r in zip(shards, self.update_rms):
            lr = group["lr"] / max(1.0, r)
            wd = group["weight_decay"]
            if wd != 0:
                p.mul_(1 - (lr / group["max_lr"]) * wd if group["decouple_lr"] else 1 - lr * wd)
            denom = v.sqrt().add_(group["eps"])
            kahan = state["kahan_comp"]
            if group["kahan_sum"] and p.dtype in (torch.float16, torch.bfloat16):
                kahan = _local(kahan)
                kahan.addcdiv_(m, denom, value=-lr)
                g.copy_(p)  # the gradient is scratch space from here on, as in optimi
                p.add_(kahan)
                kahan.add_(g.sub_(p))
            else:
                p.addcdiv_(m, denom, value=-lr)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> StableAdamW:
    """StableAdamW over `param_groups(model)`, weight decay scaled by lr / peak lr (max_lr).

    Our subclass of optimi's (same class name, so checkpoints and `lr-StableAdamW/...` metric
    names are unchanged): optimi's step as is unless FSDP shards the parameters.

    `kahan_sum=None` turns Kahan summation on only for bf16/fp16 parameters (off under amp_bf16,
    whose master weights are fp32). Triton kernels on CUDA machines (faster than foreach, which
    optimi 0.3 deprecates); a per-tensor loop on CPU. The choice is explicit because optimi's own
    default picks Triton for a group whose parameters all lack gradients, which fails on CPU.
    """
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
