"""Attention backends: FlexAttention computes what the exact torch path computes, on the CPU.

Flex runs eagerly here (the unfused reference of the same mask_mod and BlockMask the compiled
GPU kernel uses), so these tests pin the semantics (sequence, window, causal, padding) and the
block sparsity; speed is a GPU matter (tests/test_gpu.py).
"""

import pytest
import torch

from ettin.model import EttinModel, attention, model_args, unpad
from ettin.model.attention import FLEX_BLOCK_SIZE, GLOBAL_WINDOW

VOCAB = 256
HEADS, HEAD_DIM = 4, 16


def padded_mask(lengths: list[int]) -> torch.Tensor:
    """Right-padded rows, one sequence each."""
    S = max(lengths)
    return (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()


def packed_mask(rows: list[list[int]], S: int) -> torch.Tensor:
    """Each row holds sequences of the given lengths with segment ids 1..k, then padding."""
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for r, lengths in enumerate(rows):
        start = 0
        for k, n in enumerate(lengths):
            mask[r, start : start + n] = k + 1
            start += n
    return mask


LAYOUTS = {
    # T = 150 over 3 rows: two flex blocks
    "padded": padded_mask([70, 9, 71]),
    # T = 287, 9 sequences (one of length 1): three flex blocks, padding inside rows
    "packed": packed_mask([[40, 1, 59], [100], [30, 30, 20, 7]], S=100),
    # no padding at all: the torch path's dense shortcut
    "dense": torch.ones(2, 80, dtype=torch.long),
}
PATTERNS = {  # name -> (window, causal), as the layers use them (local_attention = 16)
    "encoder-global": (GLOBAL_WINDOW, False),
    "encoder-local": ((8, 8), False),
    "decoder-global": (GLOBAL_WINDOW, True),
    "decoder-local": ((7, 0), True),
}


def qkv(T: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(T, HEADS, HEAD_DIM, generator=g)).requires_grad_() for _ in range(3)]


def attend(fn, mask: torch.Tensor, window, causal) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and input gradients (q, k, v) for a fixed random cotangent."""
    batch = unpad(torch.zeros_like(mask), mask)
    q, k, v = qkv(batch.num_tokens)
    out = fn(q, k, v, batch, window, causal)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    return out.detach(), list(grads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_flex_matches_torch(layout, pattern):
    window, causal = PATTERNS[pattern]
    mask = LAYOUTS[layout]
    out_flex, grads_flex = attend(attention.flex_attention, mask, window, causal)
    out_torch, grads_torch = attend(attention.torch_attention, mask, window, causal)
    errors = [(out_flex - out_torch).abs().max().item()]
    errors += [(a - b).abs().max().item() for a, b in zip(grads_flex, grads_torch)]
    print(f"{layout} {pattern}: max |flex - torch| out, dq, dk, dv = {errors}")
    torch.testing.assert_close(out_flex, out_torch, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_flex, grads_torch):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_sparse_cached_and_padded():
    """Local windows and other sequences drop whole blocks; one BlockMask per pattern per batch."""

    def blocks(m):  # (query block, key block) pairs the kernel visits
        full = 0 if m.full_kv_num_blocks is None else m.full_kv_num_blocks.sum().item()
        return m.kv_num_blocks.sum().item() + full

    one = unpad(torch.zeros(1, 512, dtype=torch.long), torch.ones(1, 512, dtype=torch.long))
    glob = one.block_mask(GLOBAL_WINDOW, False)
    assert glob.seq_lengths == (512, 512) and glob.BLOCK_SIZE == (FLEX_BLOCK_SIZE,) * 2
    assert blocks(glob) == 16  # 4 x 4 blocks
    assert blocks(one.block_mask((8, 8), False)) == 4 + 6  # diagonal + neighbours a window reaches
    assert blocks(one.block_mask((7, 0), True)) == 4 + 3  # and only the lower ones when causal
    assert blocks(one.block_mask(GLOBAL_WINDOW, True)) == 10  # the lower triangle
    assert one.block_mask((8, 8), False) is one.block_mask((8, 8), False)  # cached, shared

    # sequences 0..199, 200..255 and (second row) 256..511: no block pairs across sequences
    mask = packed_mask([[200, 56], [256]], S=256)
    packed = unpad(torch.zeros_like(mask), mask)
    assert blocks(packed.block_mask(GLOBAL_WINDOW, False)) == 4 + 4

    unaligned = packed_mask([[100, 30]], S=130)  # T = 130 -> padded to 256, tail id of its own
    batch = unpad(torch.zeros_like(unaligned), unaligned)
    m = batch.block_mask((3, 0), True)
    assert m.seq_lengths == (256, 256)
    q, k, v = qkv(130)
    assert torch.isfinite(attention.flex_attention(q, k, v, batch, (3, 0), True)).all()
    short = unpad(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))
    assert short.block_mask(GLOBAL_WINDOW, False).seq_lengths == (256, 256)  # never one block


def test_block_masks_built_once_per_forward(monkeypatch):
    built = []
    real = attention.document_block_mask

    def counting(*args, **kwargs):
        built.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "document_block_mask", counting)
    model = tiny(causal=True)
    model.attn_impl = "flex"
    ids, mask = batch_of([30, 12])
    model(ids, mask)
    assert len(built) == 2  # global and local, shared by the 4 layers


def tiny(causal: bool) -> EttinModel:
    """`test` preset with peaky weights so a wrong mask shows in the loss."""
    torch.manual_seed(0)
    args = model_args("test", vocab_size=VOCAB, pad_token_id=0, causal=causal, local_attention=16)
    model = EttinModel(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def batch_of(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = padded_mask(lengths)
    return torch.randint(1, VOCAB, mask.shape, generator=g) * mask, mask


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_model_loss_and_grads_flex_vs_torch(causal):
    model = tiny(causal)
    ids, seg = batch_of([70, 23, 50])
    seg[0, 40:] *= 2  # row 0 packs two sequences
    labels = torch.where((ids % 3 == 0) & (seg > 0), ids, -100)
    results = {}
    for impl in ("flex", "torch"):
        model.attn_impl = impl
        model.zero_grad()
        loss = model(ids, seg, None if causal else labels).loss
        loss.backward()
        results[impl] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_flex, g_flex), (loss_torch, g_torch) = results["flex"], results["torch"]
    grad_err = max((g_flex[n] - g_torch[n]).abs().max().item() for n in g_flex)
    print(
        f"loss flex {loss_flex.item():.6f} torch {loss_torch.item():.6f}; max grad err {grad_err:.2e}"
    )
    torch.testing.assert_close(loss_flex, loss_torch, atol=1e-5, rtol=0)
    for name in g_flex:
        torch.testing.assert_close(g_flex[name], g_torch[name], atol=1e-5, rtol=1e-5, msg=name)


def test_backend_choice(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    assert attention.attention_backend(cuda) is attention.flex_attention
    assert attention.attention_backend(cpu) is attention.torch_attention
    assert attention.attention_backend(cpu, "flex") is attention.flex_attention
    assert attention.attention_backend(cuda, "torch") is attention.torch_attention
    with pytest.raises(ImportError, match="needs flash-attn"):
        attention.attention_backend(cuda, "flash")
    with pytest.raises(ValueError, match="valid: auto, flash, flex, torch"):
        attention.attention_backend(cpu, "sdpa")

    monkeypatch.setattr(attention, "flash_attn_varlen_func", lambda *a, **k: None)
    assert attention.attention_backend(cuda) is attention.flash_attention
    assert attention.attention_backend(cpu) is attention.torch_attention
    deterministic = attention.attention_backend(cuda, deterministic=True)
    assert deterministic.func is attention.flash_attention and deterministic.keywords == {
        "deterministic": True
    }
    assert attention.attention_backend(cuda, deterministic=True) is deterministic  # one object
    assert attention.attention_backend(cuda, "flex", deterministic=True) is attention.flex_attention


def test_unpad_matches_nonzero_reference():
    """The one-sync unpad (counts, then searchsorted) gives exactly what nonzero gives."""
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        B, S = torch.randint(1, 6, (2,), generator=g).tolist()
        S *= 7
        mask = torch.randint(0, 4, (B, S), generator=g) * (torch.rand(B, S, generator=g) < 0.8)
        if trial == 0:
            mask[:] = 0  # no tokens at all
        labels = torch.where(torch.rand(B, S, generator=g) < 0.3, 5, -100)
        ids = torch.arange(B * S).view(B, S)
        got = unpad(ids, mask, labels)
        real = mask.flatten() != 0
        indices = real.nonzero().squeeze(1)
        previous = torch.nn.functional.pad(mask[:, :-1], (1, 0)).flatten()
        is_start = (mask.flatten() != previous)[indices]
        start_of = is_start.nonzero().squeeze(1)
        assert torch.equal(got.indices, indices)
        assert torch.equal(got.input_ids, ids.flatten()[indices])
        assert torch.equal(got.seq_index, is_start.cumsum(0) - 1)
        assert got.cu_seqlens.tolist() == start_of.tolist() + [len(indices)]
        assert torch.equal(got.position_ids, torch.arange(len(indices)) - start_of[got.seq_index])
        assert torch.equal(got.scored, (labels.flatten()[indices] != -100).nonzero().squeeze(1))
        assert unpad(ids, mask).scored is None
