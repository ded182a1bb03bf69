"""StableAdamW with its two parameter groups, and the warm-up/stable/decay LR schedule."""

from ettin.optim.optimizer import build_optimizer, param_groups
from ettin.optim.schedule import WarmupStableDecay

__all__ = ["WarmupStableDecay", "build_optimizer", "param_groups"]
