"""torch.compile for Ettin: every transformer block compiled in place, everything else eager.

Why per block (as torchtitan does) rather than `torch.compile(model)`:
- the data-dependent work stays eager and outside any graph: `unpad` (its one host sync for
  the token/sequence/label counts), the MLM row selection, the CLM target positions, the loss,
  and the attention masks (`attention.prepare_attention` builds flex's BlockMasks before the
  blocks run, so compiled blocks only read them). There are no graph breaks inside a block;
- every block has the same code, so with dynamic shapes one graph serves all the blocks of a
  kind: layer 0 (no attn_norm), global layers, local layers. With the flash or flex backend the
  graphs have no batch-layout dimension at all: T (tokens) and N (sequences) are symbolic, so a
  new batch never recompiles. The torch backend re-pads to (B, S): B and S are symbolic too,
  but like every dynamic size B = 1 gets graphs of its own (dynamo's 0/1 specialisation);
- `nn.Module.compile` compiles in place, so parameter names (and so checkpoints, FSDP wrapping
  and HF export) are unchanged: no `_orig_mod.` prefix.

Order with the other wrappers: activation checkpointing, then compile_model, then FSDP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ettin.model import EttinModel

__all__ = ["compile_model"]


def compile_model(
    model: EttinModel, backend: str | Callable = "inductor", dynamic: bool = True
) -> None:
    """Compile each block of `model` in place (`backend` and `dynamic` as in torch.compile).

    A block is whatever `model.model.layers[i]` holds: a `Block`, or the checkpoint wrapper
    around it (activation checkpointing comes first; dynamo traces the checkpoint).
    `dynamic=True` from the first call: the token count changes with every batch, and without it
    dynamo would first specialise on the first batch's sizes and compile again on the second.
    The recompile limit counts graphs per code object, and all blocks share one forward: it is
    raised so that each layer kind keeps dynamo's default allowance (train and eval graphs, grad
    and no-grad, B = 1 on the torch path) instead of silently falling back to eager.
    """
    args = model.args
    kinds = {(i == 0, args.is_global(i)) for i in range(args.num_layers)}
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 8 * len(kinds))
    for block in model.model.layers:
        block.compile(backend=backend, dynamic=dynamic)
