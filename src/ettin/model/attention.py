"""The unpadded (varlen) batch layout and the three attention backends that consume it.

`flash` (flash_attn varlen, GPU), `flex` (PyTorch FlexAttention with a block-sparse mask, GPU
compiled, CPU eager) and `torch` (exact PyTorch SDPA, any device) compute the same thing:
attention that is block-diagonal per sequence, optionally causal, optionally limited to a
(left, right) window of keys around each query (inclusive, flash-attn convention, -1 = unlimited).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # CPU installs, or GPUs without the `gpu` extra
    flash_attn_varlen_func = None

__all__ = [
    "FLEX_BLOCK_SIZE",
    "GLOBAL_WINDOW",
    "AttentionFn",
    "AttnImpl",
    "Varlen",
    "attention_backend",
    "available_backends",
    "document_block_mask",
    "flash_attention",
    "flex_attention",
    "prepare_attention",
    "torch_attention",
    "unpad",
]

Window = tuple[int, int]
GLOBAL_WINDOW: Window = (-1, -1)
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Varlen", Window, bool], Tensor]
AttnImpl = Literal["auto", "flash", "flex", "torch"]
FLEX_BLOCK_SIZE = 128  # FlexAttention's sparse block; the flat stream is padded to a multiple


@dataclass
class Varlen:
    """A padded (B, S) batch with the padding removed: T real tokens of N sequences, flattened."""

    input_ids: Tensor  # (T,)
    indices: Tensor  # (T,) position of each token in the flattened (B*S) batch
    seq_index: Tensor  # (T,) sequence number 0..N-1 of each token
    position_ids: Tensor  # (T,) position inside its sequence, restarting at 0
    cu_seqlens: Tensor  # (N+1,) int32 sequence boundaries in the flat stream
    max_seqlen: int  # upper bound on sequence lengths: the padded width S (avoids a host sync)
    shape: tuple[int, int]  # (B, S)
    scored: Tensor | None = None  # (M,) flat positions whose label is not -100 (MLM only)
    _masks: dict = field(default_factory=dict, repr=False)  # masks, bounds (cached per forward)

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def dense(self) -> bool:
        """True when each row is exactly one sequence with no padding (unpadding is a reshape)."""
        B, S = self.shape
        return self.num_tokens == B * S and self.num_seqs == B

    def pad(self, x: Tensor) -> Tensor:
        """(T, ...) -> (B, S, ...), zeros at padding."""
        B, S = self.shape
        if self.dense:
            return x.view(B, S, *x.shape[1:])
        out = x.new_zeros(B * S, *x.shape[1:]).index_copy(0, self.indices, x)
        return out.view(B, S, *x.shape[1:])

    def mask(self, window: Window, causal: bool) -> Tensor:
        """Boolean (B, 1, S, S) mask of allowed keys in the padded rows (torch backend).

        Cached, so the layers of one forward share it; inside a compiled block it is built in
        the graph instead (no side effect on the cache, so every block sees the same guards).
        """
        if torch.compiler.is_compiling():
            return self._build_mask(window, causal)
        key = (window, causal)
        if key not in self._masks:
            self._masks[key] = self._build_mask(window, causal)
        return self._masks[key]

    def _build_mask(self, window: Window, causal: bool) -> Tensor:
        B, S = self.shape
        device = self.indices.device
        allowed = window_mask(S, window, causal, device)  # (S, S)
        # Tokens attend only inside their own sequence; padding gets id -1 and so attends to
        # padding only (never an empty row, which would give NaN). Padding outputs are dropped.
        seq = torch.full((B * S,), -1, dtype=torch.long, device=device)
        seq = seq.index_copy(0, self.indices, self.seq_index).view(B, S)
        same_seq = seq[:, :, None] == seq[:, None, :]  # (B, S, S)
        return (same_seq & allowed)[:, None]  # (B, 1, S, S)

    def block_mask(self, window: Window, causal: bool) -> BlockMask:
        """FlexAttention mask over the flat stream padded to a multiple of FLEX_BLOCK_SIZE (>= 2).

        Key j is visible from query i iff both are in the same sequence, j is inside the window
        around i and (causal) j <= i. The padding tail is one extra "sequence" (id N), so no
        query row is empty. Built once per forward per (window, causal), per block from the
        sequence ids (`document_block_mask`), and shared by the layers; blocks that are entirely
        masked (other sequences, outside a local window) are skipped.
        """
        key = ("flex", window, causal)
        if key not in self._masks:
            T = self.num_tokens
            # At least two blocks: a compiled graph would specialise on a block count of 1.
            T_pad = max(2, -(-T // FLEX_BLOCK_SIZE)) * FLEX_BLOCK_SIZE
            seq = F.pad(self.seq_index, (0, T_pad - T), value=self.num_seqs)  # (T_pad,) sorted
            self._masks[key] = document_block_mask(seq, window, causal)
        return self._masks[key]

    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of each sequence in the flat stream, as host ints (one sync, cached)."""
        if "bounds" not in self._masks:
            cu = self.cu_seqlens.tolist()
            self._masks["bounds"] = list(zip(cu[:-1], cu[1:]))
        return self._masks["bounds"]


def window_mask(S: int, window: Window, causal: bool, device: torch.device) -> Tensor:
    """(S, S) boolean: key j is visible from query i (window (left, right) inclusive, -1 = all)."""
    i = torch.arange(S, device=device)[:, None]  # query index
    j = torch.arange(S, device=device)[None, :]  # key index
    allowed = torch.ones(S, S, dtype=torch.bool, device=device)
    if window[0] >= 0:
        allowed &= i - j <= window[0]
    if window[1] >= 0:
        allowed &= j - i <= window[1]
    if causal:
        allowed &= j <= i
    return allowed


def _flex_mask_mod(seq: Tensor, window: Window, causal: bool):
    """FlexAttention mask_mod: same sequence (ids `seq`) AND window AND causal, on flat indices.

    Inside one sequence, flat distance is position distance, so the window applies directly.
    """
    left, right = window

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = seq[q_idx] == seq[kv_idx]
        if left >= 0:
            allowed = allowed & (q_idx - kv_idx <= left)
        if right >= 0:
            allowed = allowed & (kv_idx - q_idx <= right)
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        return allowed

    return mask_mod


def document_block_mask(seq: Tensor, window: Window, causal: bool) -> BlockMask:
    """The BlockMask of `_flex_mask_mod(seq, window, causal)`, computed per block, not per token.

    `seq` (T_pad,) holds non-decreasing sequence ids (the padding tail last, with an id of its
    own), T_pad a multiple of FLEX_BLOCK_SIZE: every sequence is one interval of the stream. So
    the ids in a block are the range [first, last] of its first and last token, and a (query
    block, key block) pair has a visible key iff those ranges overlap and the block pair passes
    the window and causal tests at its nearest corner. That is exact, not a bound: a sequence in
    both blocks covers everything between them, so its tokens include that nearest pair (and a
    diagonal pair holds every token's own key). A pair is full (no mask_mod call) iff both
    blocks lie inside one sequence and the farthest corner passes too. This is
    O((T_pad / FLEX_BLOCK_SIZE)^2) work instead of create_block_mask's O(T_pad^2) evaluations
    of the mask_mod, and the same blocks come out (tests/test_block_mask.py).
    """
    B = FLEX_BLOCK_SIZE
    n = seq.shape[0] // B
    first, last = seq[::B], seq[B - 1 :: B]  # (n,) the id range of each block
    qb = torch.arange(n, device=seq.device)[:, None]  # query block
    kb = torch.arange(n, device=seq.device)[None, :]  # key block
    near = (qb - kb).abs() * B - (B - 1)  # smallest |i - j| over the pair (off the diagonal)
    far = (qb - kb).abs() * B + (B - 1)  # largest |i - j|
    left, right = window
    some = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    full = (first == last)[:, None] & (first == last)[None, :] & (first[:, None] == first[None, :])
    if left >= 0:  # keys up to `left` before the query: limits pairs with kb < qb
        some &= (kb >= qb) | (near <= left)
        full &= (kb > qb) | (far <= left)
    if right >= 0:  # keys up to `right` after the query: limits pairs with kb > qb
        some &= (kb <= qb) | (near <= right)
        full &= (kb < qb) | (far <= right)
    if causal:
        some &= kb <= qb
        full &= kb < qb  # a diagonal block is never full: its upper triangle is masked
    partial = some & ~full

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        """(count, indices first) of the True blocks per query block, as create_block_mask."""
        count = dense.sum(-1, dtype=torch.int32)
        indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
        return count[None, None], indices.to(torch.int32)[None, None]  # (1, 1, n), (1, 1, n, n)

    return BlockMask.from_kv_blocks(
        *ordered(partial),
        *ordered(full),
        BLOCK_SIZE=B,
        mask_mod=_flex_mask_mod(seq, window, causal),
        seq_lengths=(seq.shape[0], seq.shape[0]),
    )


@functools.cache
def _compiled_flex() -> Callable:
    """torch.compile'd flex_attention, built once on first use."""
    return torch.compile(_flex_attention)


def _flex_fn(device: torch.device) -> Callable:
    """The flex_attention to call: compiled on CUDA, eager on the CPU and inside a compile.

    Eager flex_attention is an unfused reference; the fused kernel exists only compiled. On the
    CPU, torch 2.7 fails to compile it (C++ build error), so the CPU runs it eagerly. Inside a
    compiled block the enclosing compile lowers flex itself.
    """
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled_flex()
    return _flex_attention


def sdpa_mask(
    S: int, window: Window, causal: bool, device: torch.device
) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA over one unpadded sequence of S tokens.

    A window that cuts nothing off is dropped, and plain causal attention uses `is_causal`
    (kernels then skip the masked half instead of computing and discarding it).
    """
    left, right = window
    left_free = left < 0 or left >= S - 1
    right_free = causal or right < 0 or right >= S - 1
    if left_free and right_free:
        return None, causal
    return window_mask(S, window, causal, device), False


def _positions(flags: Tensor, count: int) -> Tensor:
    """Indices of the `count` True entries of a 1-D bool tensor, ascending (= nonzero, no sync).

    The r-th True entry is the first index whose running count reaches r + 1.
    """
    running = flags.cumsum(0)  # (n,) non-decreasing
    wanted = torch.arange(1, count + 1, device=flags.device, dtype=running.dtype)
    return torch.searchsorted(running, wanted)


def unpad(input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> Varlen:
    """Remove padding from a (B, S) batch whose attention_mask holds segment ids (0 = padding).

    Every maximal run of equal non-zero ids in a row is one sequence; positions restart at 0 for
    each. With `labels` (MLM), also the flat positions of the scored tokens (label != -100).
    Vectorised, and one host sync in all: the counts T, N (and M) are read together, since
    the output sizes depend on the data; the positions then come from a sync-free search.
    """
    B, S = attention_mask.shape
    real = (attention_mask != 0).flatten()  # (B*S,)
    previous = F.pad(attention_mask[:, :-1], (1, 0), value=0)  # (B, S) id of the token to the left
    starts = real & (attention_mask != previous).flatten()  # (B*S,) first token of each sequence
    counts = [real.sum(), starts.sum()]
    if labels is not None:
        labelled = real & (labels.flatten() != -100)  # (B*S,)
        counts.append(labelled.sum())
    counts = torch.stack(counts).tolist()  # the host sync: [T, N] or [T, N, M]
    T, N = counts[0], counts[1]
    indices = _positions(real, T)  # (T,)
    is_start = starts[indices]  # (T,)
    start_of = _positions(is_start, N)  # (N,) flat offset of each sequence start
    seq_index = is_start.cumsum(0) - 1  # (T,)
    cu_seqlens = torch.cat((start_of, start_of.new_full((1,), T)))  # (N+1,)
    return Varlen(
        input_ids=input_ids.flatten()[indices],
        indices=indices,
        seq_index=seq_index,
        position_ids=torch.arange(T, device=indices.device) - start_of[seq_index],
        cu_seqlens=cu_seqlens.to(torch.int32),
        max_seqlen=S,
        shape=(B, S),
        scored=None if labels is None else _positions(labelled[indices], counts[2]),
    )


def torch_attention(
    q: Tensor, k: Tensor, v: Tensor, batch: Varlen, window: Window, causal: bool
) -> Tensor:
    """Exact attention with PyTorch SDPA. q, k, v: (T, heads, head_dim) -> (T, heads, head_dim).

    Dense batches (each row one whole sequence) are one (B, heads, S, head_dim) call. Otherwise,
    on the CPU, one call per sequence: attention then costs sum(s_n^2) rather than B * S^2 for
    the padded rows (the host sync for the boundaries is free there). On other devices the
    batch is re-padded to (B, S) with a per-sequence mask, which needs no host sync. Inside a
    compiled block always the re-padded form: no host ints, no branch on the batch's layout,
    so one graph serves every batch. No deterministic switch: SDPA follows
    `torch.use_deterministic_algorithms`.
    """
    T, heads, head_dim = q.shape
    B, S = batch.shape
    compiling = torch.compiler.is_compiling()
    if not compiling and batch.dense:
        q, k, v = (t.view(B, S, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = sdpa_mask(S, window, causal, q.device)  # (S, S) | None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return out.transpose(1, 2).reshape(T, heads, head_dim)  # (B, heads, S, hd) -> (T, ...)
    if not compiling and q.device.type == "cpu":
        outs = []
        for start, end in batch.bounds():
            key = (end - start, window, causal)
            if key not in batch._masks:
                batch._masks[key] = sdpa_mask(end - start, window, causal, q.device)
            mask, is_causal = batch._masks[key]
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, h, s, hd)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=is_causal)
            outs.append(out[0].transpose(0, 1))  # (s, heads, head_dim)
        return torch.cat(outs)
    qkv = torch.stack((q, k, v))  # (3, T, heads, head_dim)
    qkv = qkv.new_zeros(3, B * S, heads, head_dim).index_copy(1, batch.indices, qkv)
    q, k, v = (
        qkv.view(3, B, S, heads, head_dim).transpose(2, 3).unbind(0)
    )  # (B, heads, S, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask(window, causal))
    out = out.transpose(1, 2).reshape(B * S, heads, head_dim)  # (B*S, heads, head_dim)
    return out.index_select(0, batch.indices)


def flex_attention(
    q: Tensor, k: Tensor, v: Tensor, batch: Varlen, window: Window, causal: bool
) -> Tensor:
    """FlexAttention over the flat stream as one row. q, k, v: (T, heads, head_dim) -> same.

    The stream is padded to T_pad (a multiple of FLEX_BLOCK_SIZE, so few distinct shapes) and
    masked by `batch.block_mask` (same sequence, window, causal). On CUDA the compiled kernel
    (block-sparse: local layers skip blocks outside the window); on the CPU the eager reference.
    Deterministic as it is: the backward is two passes (dq; dk, dv) with no atomics.
    """
    T, heads, head_dim = q.shape
    block_mask = batch.block_mask(window, causal)
    T_pad = block_mask.seq_lengths[0]
    q, k, v = (
        F.pad(t.transpose(0, 1), (0, 0, 0, T_pad - T))[None] for t in (q, k, v)
    )  # (1, heads, T_pad, head_dim)
    attend = _flex_fn(q.device)
    out = attend(q, k, v, block_mask=block_mask)  # (1, heads, T_pad, head_dim)
    return out[0, :, :T].transpose(0, 1)  # (T, heads, head_dim)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    batch: Varlen,
    window: Window,
    causal: bool,
    deterministic: bool = False,
) -> Tensor:
    """flash_attn varlen kernel (fp16/bf16 only: fp32 inputs run in bf16 and are cast back).

    `deterministic` selects flash-attn's deterministic backward (slower; same forward).
    """
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    cu, max_len = batch.cu_seqlens, batch.max_seqlen
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_len,
        max_len,
        causal=causal,
        window_size=window,
        deterministic=deterministic,
    )
    return out.to(dtype)


# One object per setting, so a compiled block that guards on the function it is given sees the
# same one every forward.
_deterministic_flash: AttentionFn = functools.partial(flash_attention, deterministic=True)


def attention_backend(
    device: torch.device, name: AttnImpl = "auto", deterministic: bool = False
) -> AttentionFn:
    """The attention function for a device and `attn_impl`.

    "auto": flash on CUDA when flash_attn imports, else flex on CUDA, else torch (CPU).
    "flex" and "torch" run anywhere; "flash" needs flash-attn (and CUDA). `deterministic` only
    changes flash (its deterministic backward); flex and torch need no switch (see theirs).
    """
    if name == "auto":
        if device.type == "cuda":
            name = "flash" if flash_attn_varlen_func is not None else "flex"
        else:
            name = "torch"
    if name == "flash":
        if flash_attn_varlen_func is None:
            raise ImportError("attention backend 'flash' needs flash-attn: pip install -e '.[gpu]'")
        return _deterministic_flash if deterministic else flash_attention
    if name == "flex":
        return flex_attention
    if name == "torch":
        return torch_attention
    raise ValueError(f"unknown attention backend {name!r}; valid: auto, flash, flex, torch")


@functools.cache
def _flex_trains_on(device_type: str) -> bool:
    """Whether flex_attention runs forward and backward on this device type (one tiny probe).

    CUDA always (the compiled kernel); the CPU runs flex eagerly, whose backward torch 2.7 has
    and torch 2.11 refuses ("FlexAttention does not support backward on CPU").
    """
    if device_type == "cuda":
        return True
    q = torch.zeros(1, 1, FLEX_BLOCK_SIZE, 8, device=device_type, requires_grad=True)
    try:
        _flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True


def available_backends(device: torch.device) -> list[str]:
    """The attention backends that train (forward and backward) on `device`, fastest first.

    flash: CUDA with flash_attn installed; flex: CUDA, or a CPU whose torch has flex's eager
    backward; torch: everywhere.
    """
    names = []
    if device.type == "cuda" and flash_attn_varlen_func is not None:
        names.append("flash")
    if _flex_trains_on(device.type):
        names.append("flex")
    return [*names, "torch"]


def prepare_attention(attn_fn: AttentionFn, batch: Varlen, patterns: Iterable[tuple]) -> None:
    """Build, before the layers run, the per-forward state `attn_fn` reads from `batch`.

    `patterns` are the (window, causal) pairs the layers use. Only flex needs this: its block
    masks are built here, eagerly, so that compiled blocks read them rather than rebuild them
    (and every block sees the same cache). The torch mask is built lazily by its first layer.
    """
    if attn_fn is flex_attention:
        for window, causal in patterns:
            batch.block_mask(window, causal)
