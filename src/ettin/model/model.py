"""The Ettin transformer: one model for the encoder (MLM) and the decoder (CLM).

Read top to bottom in HF ModernBERT order: embeddings -> MLP -> RoPE -> attention -> block ->
backbone -> prediction head -> model (losses) -> init. Module names are HF's encoder names, so
`state_dict()` loads into `ModernBertForMaskedLM` as is. Activations are unpadded: (T, H) for the
T real tokens of the batch (see `attention.Varlen`). Encoder vs decoder is only `args.causal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ettin.model.attention import (
    GLOBAL_WINDOW,
    AttentionFn,
    AttnImpl,
    Varlen,
    attention_backend,
    prepare_attention,
    unpad,
)
from ettin.model.sizes import ModelArgs

__all__ = ["EttinModel", "EttinOutput", "next_token_positions"]


def _layer_norm(args: ModelArgs) -> nn.LayerNorm:
    return nn.LayerNorm(args.hidden_size, eps=args.norm_eps, bias=False)


class Embeddings(nn.Module):
    """Token embedding + LayerNorm (no position embeddings: RoPE is applied in attention)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(
            args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id
        )
        self.norm = _layer_norm(args)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class MLP(nn.Module):
    """GLU: Wo(gelu(input) * gate) with [input | gate] = Wi(x); the FIRST half is activated."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.Wi = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.Wo = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        input, gate = self.Wi(x).chunk(2, dim=-1)  # (T, I) each
        return self.Wo(F.gelu(input) * gate)  # exact (erf) GELU


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoPE cos/sin, (T, 1, head_dim) in fp32, for rotate_half (GPT-NeoX) over the full head_dim."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
    inv_freq = 1.0 / theta ** (steps.float() / head_dim)  # (head_dim/2,)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (T, heads, head_dim) by the per-token angles; halves are [x1 | x2], not interleaved."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Self-attention with fused Wqkv ([q | k | v], head-major), RoPE, and a global or local window."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.num_heads, self.head_dim = args.num_heads, args.head_dim
        self.Wqkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=False)
        self.Wo = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.out_drop = nn.Dropout(args.attn_out_dropout)
        self.causal = args.causal
        is_global = args.is_global(layer)
        self.window = GLOBAL_WINDOW if is_global else args.local_window
        self.rope_theta = args.global_rope_theta if is_global else args.local_rope_theta

    def forward(
        self,
        x: Tensor,
        rope: dict[float, tuple[Tensor, Tensor]],
        batch: Varlen,
        attn_fn: AttentionFn,
    ) -> Tensor:
        cos, sin = rope[self.rope_theta]
        qkv = self.Wqkv(x).view(-1, 3, self.num_heads, self.head_dim)  # (T, 3, heads, head_dim)
        q, k, v = qkv.unbind(1)  # (T, heads, head_dim) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attn_fn(q, k, v, batch, self.window, self.causal)  # (T, heads, head_dim)
        return self.out_drop(self.Wo(out.flatten(1)))  # (T, H)


class Block(nn.Module):
    """Pre-norm transformer block; layer 0 has no attn_norm (the embedding norm plays that role)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.Identity() if layer == 0 else _layer_norm(args)
        self.attn = Attention(args, layer)
        self.mlp_norm = _layer_norm(args)
        self.mlp = MLP(args)

    def forward(
        self,
        x: Tensor,
        rope: dict[float, tuple[Tensor, Tensor]],
        batch: Varlen,
        attn_fn: AttentionFn,
    ) -> Tensor:
        # The residual stream keeps its dtype (fp32 under bf16 autocast, where the branches
        # return bf16); the cast is the promotion `+` would do anyway, written out: it also keeps
        # torch 2.7's inductor from fusing `fp32 + bf16 matmul` into one mixed-dtype addmm.
        x = x + self.attn(self.attn_norm(x), rope, batch, attn_fn).to(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).to(x.dtype)


class Backbone(nn.Module):
    """HF `ModernBertModel`: embeddings, blocks, final norm. Unpadded ids (T,) -> states (T, H)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.final_norm = _layer_norm(args)

    def forward(self, batch: Varlen, attn_fn: AttentionFn) -> Tensor:
        x = self.embeddings(batch.input_ids)  # (T, H)
        thetas = {self.args.global_rope_theta, self.args.local_rope_theta}
        rope = {t: rope_cos_sin(batch.position_ids, self.args.head_dim, t) for t in thetas}
        patterns = {(layer.attn.window, layer.attn.causal) for layer in self.layers}
        prepare_attention(attn_fn, batch, patterns)  # masks the layers share, built once
        for layer in self.layers:
            x = layer(x, rope, batch, attn_fn)
        return self.final_norm(x)


class Head(nn.Module):
    """Prediction head before the tied unembedding: dense (no bias) -> GELU -> LayerNorm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.norm = _layer_norm(args)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(x)))


@dataclass
class EttinOutput:
    """What `EttinModel.forward` returns; logits/targets cover only the scored positions."""

    loss: Tensor  # () mean CE over the targets (sum / num_targets; 0 when there are none)
    logits: Tensor  # (num_targets, V)
    targets: Tensor  # (num_targets,) token ids
    num_targets: Tensor  # () long, so callers can reweight losses across microbatches


def next_token_positions(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Flat positions that have a next token in their own sequence (all but each sequence's last).

    Vectorised, no host sync: the r-th kept token sits at r + (number of sequences that end at or
    before kept-rank r); sequence n's kept tokens end at rank cu_seqlens[n+1] - (n+1).
    """
    cu = cu_seqlens.long()
    num_seqs = cu.shape[0] - 1
    end_rank = cu[1:] - torch.arange(1, num_seqs + 1, device=cu.device)  # (N,) non-decreasing
    ranks = torch.arange(num_tokens - num_seqs, device=cu.device)  # (T - N,)
    return ranks + torch.searchsorted(end_rank, ranks, right=True)


class EttinModel(nn.Module):
    """Encoder (`causal=False`, MLM) or decoder (`causal=True`, CLM) with HF ModernBERT names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Runtime choices, not weights (and not ModelArgs: they do not change what is computed).
        self.attn_impl: AttnImpl = "auto"  # attention backend, see attention.attention_backend
        self.deterministic = False  # deterministic kernels where a backend has the choice
        self.model = Backbone(args)
        self.head = Head(args)
        self.decoder = nn.Linear(args.hidden_size, args.vocab_size, bias=True)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight  # tied: one tensor
        self.init_weights()

    def _encode(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Varlen]:
        batch = unpad(input_ids, attention_mask, labels)
        attn_fn = attention_backend(input_ids.device, self.attn_impl, self.deterministic)
        return self.model(batch, attn_fn), batch

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> EttinOutput:
        """Loss without materialising (B, S, V): only scored positions reach the vocab projection.

        MLM: positions with labels != -100. CLM: every token except each sequence's last, predicting
        the next token of the same sequence (targets come from input_ids; `labels` is ignored).
        """
        if self.args.causal:
            h, batch = self._encode(input_ids, attention_mask)  # (T, H)
            positions = next_token_positions(batch.cu_seqlens, batch.num_tokens)  # (T - N,)
            targets = batch.input_ids[positions + 1]
        else:
            if labels is None:
                raise ValueError(
                    "the MLM forward needs labels (-100 = unscored); use padded_logits for inference"
                )
            h, batch = self._encode(input_ids, attention_mask, labels)  # (T, H)
            positions = batch.scored  # (M,) flat positions with label != -100, found by unpad
            targets = labels.flatten()[batch.indices[positions]]
        logits = self.decoder(self.head(h[positions]))  # (num_targets, V)
        num_targets = torch.full((), positions.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / num_targets.clamp(min=1)
        return EttinOutput(loss=loss, logits=logits, targets=targets, num_targets=num_targets)

    def padded_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, S, V) logits, zeros at padding; for inference and tests only (it is large)."""
        h, batch = self._encode(input_ids, attention_mask)
        return batch.pad(self.decoder(self.head(h)))

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, S, H) final-norm outputs, zeros at padding."""
        h, batch = self._encode(input_ids, attention_mask)
        return batch.pad(h)

    @torch.no_grad()
    def init_weights(self) -> None:
        """`full_megatron` init: truncated normal (+-cutoff*std); LayerNorm weight 1; decoder.bias 0."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.num_layers)
        stds = {  # module-name suffix -> std; decoder.weight is tok_embeddings (tied)
            "tok_embeddings": std,
            "attn.Wqkv": std,
            "attn.Wo": out_std,
            "mlp.Wi": std,
            "mlp.Wo": out_std,
            "head.dense": std,
        }
        cutoff = self.args.init_cutoff_factor
        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            elif module is self.decoder:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear | nn.Embedding):
                suffix = next((s for s in stds if name.endswith(s)), None)
                if suffix is None:
                    raise RuntimeError(
                        f"init_weights has no std for module {name!r}; add it to the table"
                    )
                s = stds[suffix]
                nn.init.trunc_normal_(module.weight, mean=0.0, std=s, a=-cutoff * s, b=cutoff * s)
