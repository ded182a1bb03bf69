"""The unpadded (varlen) batch layout and the two attention backends that consume it.

`flash` (flash_attn varlen, GPU) and `torch` (exact PyTorch SDPA, any device) compute the same
thing: attention that is block-diagonal per sequence, optionally causal, optionally limited to a
(left, right) window of keys around each query (inclusive, flash-attn convention, -1 = unlimited).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # CPU installs, or GPUs without the `gpu` extra
    flash_attn_varlen_func = None

__all__ = [
    "GLOBAL_WINDOW",
    "AttentionFn",
    "Varlen",
    "attention_backend",
    "flash_attention",
    "torch_attention",
    "unpad",
]

Window = tuple[int, int]
GLOBAL_WINDOW: Window = (-1, -1)
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Varlen", Window, bool], Tensor]


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
    _masks: dict = field(default_factory=dict, repr=False)  # torch backend: masks, bounds (cached)

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
        """Boolean (B, 1, S, S) mask of allowed keys in the padded rows (torch backend, not CPU)."""
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


def unpad(input_ids: Tensor, attention_mask: Tensor) -> Varlen:
    """Remove padding from a (B, S) batch whose attention_mask holds segment ids (0 = padding).

    Every maximal run of equal non-zero ids in a row is one sequence; positions restart at 0 for
    each. Vectorised: two `nonzero` calls are the only host syncs (output sizes depend on data).
    """
    B, S = attention_mask.shape
    real = attention_mask != 0
    previous = F.pad(attention_mask[:, :-1], (1, 0), value=0)  # (B, S) id of the token to the left
    starts = real & (attention_mask != previous)  # (B, S) first token of each sequence
    indices = real.flatten().nonzero().squeeze(1)  # (T,)
    is_start = starts.flatten()[indices]  # (T,)
    start_of = is_start.nonzero().squeeze(1)  # (N,) flat offset of each sequence start
    seq_index = is_start.cumsum(0) - 1  # (T,)
    T = indices.shape[0]
    return Varlen(
        input_ids=input_ids.flatten()[indices],
        indices=indices,
        seq_index=seq_index,
        position_ids=torch.arange(T, device=indices.device) - start_of[seq_index],
        cu_seqlens=F.pad(start_of, (0, 1), value=T).to(torch.int32),
        max_seqlen=S,
        shape=(B, S),
    )


def torch_attention(
    q: Tensor, k: Tensor, v: Tensor, batch: Varlen, window: Window, causal: bool
) -> Tensor:
    """Exact attention with PyTorch SDPA. q, k, v: (T, heads, head_dim) -> (T, heads, head_dim).

    Dense batches (each row one whole sequence) are one (B, heads, S, head_dim) call. Otherwise,
    on the CPU, one call per sequence: attention then costs sum(s_n^2) rather than B * S^2 for
    the padded rows (the host sync for the boundaries is free there). On other devices the
    batch is re-padded to (B, S) with a per-sequence mask, which needs no host sync.
    """
    T, heads, head_dim = q.shape
    B, S = batch.shape
    if batch.dense:
        q, k, v = (t.view(B, S, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = sdpa_mask(S, window, causal, q.device)  # (S, S) | None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return out.transpose(1, 2).reshape(T, heads, head_dim)  # (B, heads, S, hd) -> (T, ...)
    if q.device.type == "cpu":
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


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, batch: Varlen, window: Window, causal: bool
) -> Tensor:
    """flash_attn varlen kernel (fp16/bf16 only: fp32 inputs run in bf16 and are cast back)."""
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    cu, max_len = batch.cu_seqlens, batch.max_seqlen
    out = flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, causal=causal, window_size=window
    )
    return out.to(dtype)


def attention_backend(
    device: torch.device, name: Literal["auto", "flash", "torch"] = "auto"
) -> AttentionFn:
    """The attention function for a device: flash on CUDA when flash_attn imports, else torch."""
    if name == "auto":
        name = "flash" if device.type == "cuda" and flash_attn_varlen_func is not None else "torch"
    if name == "flash":
        if flash_attn_varlen_func is None:
            raise ImportError("attention backend 'flash' needs flash-attn: pip install -e '.[gpu]'")
        return flash_attention
    if name == "torch":
        return torch_attention
    raise ValueError(f"unknown attention backend {name!r}; valid: auto, flash, torch")
