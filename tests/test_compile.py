"""torch.compile of the blocks (`ettin.parallel.compile.compile_model`) on the CPU.

- the number of compiled graphs stays small and fixed over varied batches (aot_eager: fast),
  counted as dynamo's `unique_graphs` (torch 2.11 calls the backend twice for some frames, so
  backend calls overcount);
- compiled loss and gradients equal eager ones (inductor, fp32);
- bf16 autocast + inductor runs forward and backward (torch 2.7 bug, see `Block.forward`).
"""

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

from ettin.model import EttinModel, model_args
from ettin.model.attention import available_backends
from ettin.parallel.compile import compile_model
from ettin.parallel.fsdp import apply_activation_checkpointing

VOCAB = 256
NEEDS_FLEX_BACKWARD = pytest.mark.skipif(
    "flex" not in available_backends(torch.device("cpu")),
    reason="this torch has no FlexAttention backward on the CPU (2.11)",
)


def tiny(causal: bool, **overrides) -> EttinModel:
    torch.manual_seed(0)
    args = model_args(
        "test", vocab_size=VOCAB, pad_token_id=0, causal=causal, local_attention=16, **overrides
    )
    model = EttinModel(args)
    with torch.no_grad():  # peaky attention, so a wrong mask shows
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def make_batch(B: int, S: int, kind: str, seed: int):
    """(ids, segment ids, MLM labels): 'dense' (no padding), 'padded' (one sequence per row,
    random lengths) or 'packed' (two or three sequences per row, then padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    if kind == "dense":
        mask = torch.ones(B, S, dtype=torch.long)
    else:
        lengths = torch.randint(S // 3, S + 1, (B,), generator=g)
        lengths[0] = S
        mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
        if kind == "packed":
            cuts = torch.arange(S)[None, :]
            mask = mask + (cuts >= lengths[:, None] // 3) + (cuts >= lengths[:, None] // 2)
            mask = mask * (torch.arange(S)[None, :] < lengths[:, None])
    ids = ids * (mask > 0)
    labels = torch.where((ids % 3 == 0) & (mask > 0), ids, -100)
    return ids, mask, labels


# 12 batches: B, S, T and N all change; padded, packed and dense
SHAPES = [
    (2, 40, "padded"),
    (3, 57, "packed"),
    (4, 33, "dense"),
    (2, 150, "packed"),
    (5, 21, "padded"),
    (3, 64, "dense"),
    (6, 48, "packed"),
    (2, 97, "padded"),
    (4, 70, "packed"),
    (3, 29, "padded"),
    (2, 260, "padded"),
    (5, 44, "packed"),
]


def unique_graphs() -> int:
    """Graphs dynamo has compiled since `counters.clear()` (one per frame and guard set)."""
    return int(counters["stats"]["unique_graphs"])


class Counting:
    """A dynamo backend that counts the calls to its compiled graphs, then runs aot_eager."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        compiled = aot_eager(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


def step(model: EttinModel, ids, mask, labels) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(ids, mask, None if model.args.causal else labels).loss
    loss.backward()
    return loss.detach()


def compiled_step(model: EttinModel, *batch) -> tuple[torch.Tensor, int]:
    """`step` on a compiled model; (loss, graphs dynamo compiled during it)."""
    before = unique_graphs()
    loss = step(model, *batch)
    return loss, unique_graphs() - before


def assert_same_step(compiled: EttinModel, eager: EttinModel, batch, atol: float):
    """One training step on both; losses and parameter gradients agree.

    Returns (max error, graphs compiled for the compiled step). Only that step's graphs count:
    eager flex on torch 2.7 compiles the flex op itself (backend "eager"), which unique_graphs
    sees too.
    """
    loss_c, graphs = compiled_step(compiled, *batch)
    loss_e = step(eager, *batch)
    torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=0)
    error = (loss_c - loss_e).abs().item()
    grads_e = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in eager.named_parameters()}
    for name, p in compiled.named_parameters():
        reference = grads_e[name.replace("_checkpoint_wrapped_module.", "")].grad
        torch.testing.assert_close(p.grad, reference, atol=atol, rtol=atol, msg=name)
        error = max(error, (p.grad - reference).abs().max().item())
    return error, graphs


@pytest.mark.parametrize(
    "impl, causal, checkpointing",
    [
        ("torch", False, False),
        ("torch", True, True),
        pytest.param("flex", True, False, marks=NEEDS_FLEX_BACKWARD),
    ],
    ids=["torch-encoder", "torch-decoder-ac", "flex-decoder"],
)
def test_graph_count_stays_fixed(impl, causal, checkpointing):
    """12 batches (B, S, T, N all change): one graph per layer kind, all from the first batch,
    no graph breaks, every block runs compiled, and the steps equal eager ones (so no graph
    kept a mask of an earlier batch). Flex encoder graphs differ only by `causal`; three cases
    keep the file's compile time down."""
    torch._dynamo.reset()
    counters.clear()
    eager, model = tiny(causal), tiny(causal)
    eager.attn_impl = model.attn_impl = impl
    if checkpointing:  # the training order: activation checkpointing, then compile
        apply_activation_checkpointing(model)
    backend = Counting()
    compile_model(model, backend=backend)
    # flash and flex graphs have no batch dimension: B = 1 is just another batch
    shapes = SHAPES if impl == "torch" else [(1, 90, "packed"), *SHAPES[1:]]
    per_batch, error, graphs = [], 0.0, 0
    for i, (B, S, kind) in enumerate(shapes):
        calls = backend.calls
        err, new = assert_same_step(model, eager, make_batch(B, S, kind, seed=i), 1e-5)
        error, graphs = max(error, err), graphs + new
        assert backend.calls - calls == model.args.num_layers  # every block ran compiled
        per_batch.append(graphs)
    name = f"{impl} {'decoder' if causal else 'encoder'}{' + AC' if checkpointing else ''}"
    print(f"{name}: graphs after each batch {per_batch}; max error vs eager {error:.2e}")
    # one graph per layer kind (layer 0 without attn_norm, global, local), all from batch 1
    assert per_batch == [3] * len(shapes)
    assert not counters["graph_break"], dict(counters["graph_break"])
    if impl == "torch" and not causal:
        # B = 1 (the re-padded (B, S) layout) is specialised once per kind, then fixed too
        for i, S in enumerate((50, 81)):
            graphs += compiled_step(model, *make_batch(1, S, "packed", seed=100 + i))[1]
        print(f"{name}, then two B = 1 batches: {graphs} graphs")
        assert graphs == 6


def test_inductor_matches_eager_fp32():
    """Compiled (inductor) loss and parameter gradients equal eager ones; two layer kinds."""
    torch._dynamo.reset()
    eager = tiny(causal=False, num_layers=2, global_attn_every_n_layers=2)
    compiled = tiny(causal=False, num_layers=2, global_attn_every_n_layers=2)
    compiled.attn_impl = eager.attn_impl = "torch"
    compile_model(compiled)
    errors = [
        assert_same_step(compiled, eager, make_batch(B, S, kind, seed), 1e-5)[0]
        for seed, (B, S, kind) in enumerate([(3, 40, "packed"), (2, 33, "dense")])
    ]
    print(f"inductor vs eager fp32, max |loss or grad diff| per batch: {errors}")


def test_inductor_bf16_autocast_trains():
    """torch 2.7's inductor fused `fp32 residual + bf16 matmul` into an addmm of mixed dtypes
    ("self and mat2 must have the same dtype"); with the explicit cast in Block it compiles."""
    torch._dynamo.reset()
    eager = tiny(causal=False, num_layers=1)
    compiled = tiny(causal=False, num_layers=1)
    compile_model(compiled)
    batch = make_batch(3, 40, "packed", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_c = step(compiled, *batch)
        loss_e = step(eager, *batch)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in compiled.parameters())
    print(f"bf16 autocast loss: compiled {loss_c.item():.4f}, eager {loss_e.item():.4f}")
    assert abs(loss_c.item() - loss_e.item()) < 0.05


def test_build_model_takes_runtime_settings_from_the_config(tokenizer_dir):
    from ettin.config import load_config
    from ettin.tokenizer import load_tokenizer
    from ettin.train import build_model

    cfg = load_config(
        "yamls/encoder-17m.yaml",
        ["model.attn_impl=flex", "deterministic=true", "model.num_layers=2"],
    )
    model = build_model(cfg, load_tokenizer(tokenizer_dir))
    assert (model.attn_impl, model.deterministic) == ("flex", True)
    assert "attn_impl" not in model.state_dict() and model.args.num_layers == 2
