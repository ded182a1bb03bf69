"""How the model is distributed and compiled: FSDP wrapping per block, the precision of gradient
reduction, activation checkpointing, and torch.compile. The model itself never imports this.

`parallelize(model, cfg, device)` applies them in torchtitan's order: activation checkpointing,
then torch.compile, then FSDP (prepared here, performed by Composer inside `Trainer`).
"""

from ettin.parallel.apply import Parallelized, parallelize

__all__ = ["Parallelized", "parallelize"]
