"""How the model is distributed and compiled: FSDP wrapping per block, the precision of gradient
reduction, activation checkpointing, and torch.compile. The model itself never imports this."""
