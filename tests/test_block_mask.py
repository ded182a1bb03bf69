"""The flex BlockMask built per block from the sequence ids equals create_block_mask's.

`document_block_mask` decides each (query block, key block) pair from the first and last
sequence id of the two blocks; `create_block_mask` evaluates the mask_mod at every token pair
(T_pad^2 points). Both must give the same partial and full blocks, hence the same attention,
for packed, padded and aligned streams, global and local windows, encoder and decoder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ettin.model import attention, unpad
from ettin.model.attention import FLEX_BLOCK_SIZE, GLOBAL_WINDOW

HEADS, HEAD_DIM = 2, 8


def reference_block_mask(seq: torch.Tensor, window, causal: bool):
    """What ettin built before: create_block_mask over every token pair of the same mask_mod."""
    T_pad = seq.shape[0]
    mask_mod = attention._flex_mask_mod(seq, window, causal)
    return create_block_mask(
        mask_mod, None, None, T_pad, T_pad, device="cpu", BLOCK_SIZE=FLEX_BLOCK_SIZE
    )


def block_sets(m) -> tuple[list[set[int]], list[set[int]]]:
    """(partial, full) key blocks of every query block, as sets."""

    def sets(count, indices):
        if count is None:
            return [set() for _ in range(m.kv_num_blocks.shape[-1])]
        return [set(indices[0, 0, q, : count[0, 0, q]].tolist()) for q in range(count.shape[-1])]

    return sets(m.kv_num_blocks, m.kv_indices), sets(m.full_kv_num_blocks, m.full_kv_indices)


def token_mask(m, seq, window, causal) -> torch.Tensor:
    """The (T_pad, T_pad) mask a BlockMask implies: full blocks all visible, partial ones by mask_mod."""
    B, T_pad = FLEX_BLOCK_SIZE, seq.shape[0]
    i, j = torch.arange(T_pad)[:, None], torch.arange(T_pad)[None, :]
    exact = attention._flex_mask_mod(seq, window, causal)(None, None, i, j)
    partial, full = block_sets(m)
    blocks = torch.zeros(T_pad // B, T_pad // B, dtype=torch.bool)
    fulls = torch.zeros_like(blocks)
    for q in range(T_pad // B):
        blocks[q, list(partial[q])] = True
        fulls[q, list(full[q])] = True
    up = lambda b: b.repeat_interleave(B, 0).repeat_interleave(B, 1)  # noqa: E731
    return (up(blocks) & exact) | up(fulls)


def stream(lengths: list[int], T_pad: int) -> torch.Tensor:
    """Sequence ids of the flat stream: sequences of these lengths, then the padding tail (id N)."""
    seq = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])
    return F.pad(seq, (0, T_pad - seq.shape[0]), value=len(lengths))


STREAMS = {
    "one-sequence": stream([512], 512),
    "packed": stream([40, 1, 300, 87, 128, 200, 7], 896),
    "boundaries-on-blocks": stream([128, 256, 128], 512),
    "padding-tail": stream([100, 30], 256),
    "short": stream([5], 256),
    "many-short": stream([3] * 80 + [17, 9], 384),
}
PATTERNS = {
    "encoder-global": (GLOBAL_WINDOW, False),
    "encoder-local": ((64, 64), False),
    "encoder-wide": ((200, 200), False),
    "encoder-left-only": ((130, -1), False),
    "decoder-global": (GLOBAL_WINDOW, True),
    "decoder-local": ((127, 0), True),
    "decoder-tiny": ((3, 0), True),
    # windows at the block-pair corners: nearest |i - j| = 128 d - 127, farthest 128 d + 127
    "edges-near": ((129, 1), False),
    "edges-far": ((255, 127), False),
    "decoder-edge": ((1, 0), True),
}


@pytest.mark.parametrize("name", list(STREAMS))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_same_blocks_as_create_block_mask(name, pattern):
    seq, (window, causal) = STREAMS[name], PATTERNS[pattern]
    new = attention.document_block_mask(seq, window, causal)
    old = reference_block_mask(seq, window, causal)
    assert new.seq_lengths == old.seq_lengths and new.BLOCK_SIZE == old.BLOCK_SIZE
    assert block_sets(new) == block_sets(old)
    # the transposed (query-block) view the backward reads agrees too
    for a, b in (
        (new.q_num_blocks, old.q_num_blocks),
        (new.full_q_num_blocks, old.full_q_num_blocks),
    ):
        assert torch.equal(a, b)
    implied = token_mask(new, seq, window, causal)
    assert torch.equal(implied, token_mask(old, seq, window, causal))
    i, j = torch.arange(seq.shape[0])[:, None], torch.arange(seq.shape[0])[None, :]
    assert torch.equal(implied, attention._flex_mask_mod(seq, window, causal)(None, None, i, j))


@pytest.mark.parametrize("pattern", ["encoder-local", "decoder-global"])
def test_same_attention_as_create_block_mask_and_torch(pattern):
    """Flex over the new mask = flex over the old one = the exact torch backend, forward."""
    window, causal = PATTERNS[pattern]
    mask = torch.zeros(3, 200, dtype=torch.long)
    mask[0, :150], mask[0, 150:190] = 1, 2  # packed, then padding
    mask[1, :] = 1  # one whole row
    mask[2, :9] = 1  # padding-heavy
    batch = unpad(torch.zeros_like(mask), mask)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch.num_tokens, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    ours = attention.flex_attention(q, k, v, batch, window, causal)
    exact = attention.torch_attention(q, k, v, batch, window, causal)
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=1e-5)
    T_pad = batch.block_mask(window, causal).seq_lengths[0]
    seq = F.pad(batch.seq_index, (0, T_pad - batch.num_tokens), value=batch.num_seqs)
    qp, kp, vp = (F.pad(t.transpose(0, 1), (0, 0, 0, T_pad - t.shape[0]))[None] for t in (q, k, v))
    old = flex_attention(qp, kp, vp, block_mask=reference_block_mask(seq, window, causal))
    torch.testing.assert_close(ours, old[0, :, : batch.num_tokens].transpose(0, 1), atol=0, rtol=0)
