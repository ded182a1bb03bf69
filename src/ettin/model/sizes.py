"""Model hyper-parameters (`ModelArgs`), the size presets and the closed-form parameter count."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAUSAL_WINDOWS", "SIZES", "ModelArgs", "model_args", "parameter_count"]

CAUSAL_WINDOWS = ("hf", "reference")
"""Values of `ModelArgs.causal_window` (and `model.causal_window` in a run file)."""


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Everything that shapes an Ettin model; encoder and decoder differ only in `causal`."""

    num_layers: int
    """Transformer blocks (L)."""
    hidden_size: int
    """Residual width (H); a multiple of `num_heads`."""
    intermediate_size: int
    """GLU width (I); `mlp.Wi` outputs 2*I features (input half, then gate half)."""
    num_heads: int
    """Attention heads; head_dim = hidden_size // num_heads."""
    vocab_size: int = 50368
    """Rows of the (tied) token embedding; at least len(tokenizer)."""
    causal: bool = False
    """False: bidirectional encoder trained with MLM. True: causal decoder trained with CLM."""
    global_attn_every_n_layers: int = 3
    """Layer i attends globally iff i % n == 0; the others use the sliding window."""
    local_attention: int = 128
    """Total sliding window of local layers (HF `local_attention`); see `local_window`."""
    causal_window: str = "hf"
    """A decoder's local window rule (`local_window`): "hf", i - local_attention//2 < j <= i
    (64 keys for 128: HF 4.57.6's rule, what an exported decoder computes), or "reference",
    i - local_attention//2 <= j <= i (65 keys: the reference training's flash window (64, 64)
    plus causal; imported reference decoders use it). Encoders see the same keys under both."""
    global_rope_theta: float = 10000.0
    """RoPE base of global layers."""
    local_rope_theta: float = 10000.0
    """RoPE base of local layers."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_std: float = 0.02
    """Base std of the truncated-normal init (`full_megatron`)."""
    init_cutoff_factor: float = 2.0
    """Init truncation at +-factor*std."""
    attn_out_dropout: float = 0.0
    """Dropout after the attention output projection (the reference trained with 0.1)."""
    pad_token_id: int | None = None
    """Embedding padding_idx; read it from the tokenizer, never hard-code it."""

    def __post_init__(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "vocab_size",
            "global_attn_every_n_layers",
            "local_attention",
            "global_rope_theta",
            "local_rope_theta",
            "norm_eps",
            "init_std",
            "init_cutoff_factor",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelArgs.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads}); pick a num_heads that divides {self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.local_attention % 2:
            raise ValueError(
                f"ModelArgs.local_attention ({self.local_attention}) must be even: it is the total "
                "window, split into local_attention // 2 tokens on each side"
            )
        if self.causal_window not in CAUSAL_WINDOWS:
            raise ValueError(
                f"ModelArgs.causal_window must be one of {', '.join(CAUSAL_WINDOWS)}, got "
                f"{self.causal_window!r}"
            )
        if not 0.0 <= self.attn_out_dropout < 1.0:
            raise ValueError(
                f"ModelArgs.attn_out_dropout must be in [0, 1), got {self.attn_out_dropout}"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"ModelArgs.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads

    def is_global(self, layer: int) -> bool:
        """Whether `layer` attends to the whole sequence (else a sliding window)."""
        return layer % self.global_attn_every_n_layers == 0

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Per-layer attention kind in HF's vocabulary ("full_attention" / "sliding_attention")."""
        return tuple(
            "full_attention" if self.is_global(i) else "sliding_attention"
            for i in range(self.num_layers)
        )

    @property
    def local_window(self) -> tuple[int, int]:
        """(left, right) keys a local-layer query sees, flash-attn style, inclusive.

        Encoder: |i - j| <= local_attention // 2 (129 keys for 128; HF and the reference).
        Decoder, causal_window "hf": i - local_attention // 2 < j <= i (64 keys for 128).
        Decoder, causal_window "reference": i - local_attention // 2 <= j <= i (65 keys).
        """
        half = self.local_attention // 2
        if not self.causal:
            return (half, half)
        return (half, 0) if self.causal_window == "reference" else (half - 1, 0)


SIZES: dict[str, dict] = {
    "17m": dict(num_layers=7, hidden_size=256, intermediate_size=384, num_heads=4),
    "32m": dict(num_layers=10, hidden_size=384, intermediate_size=576, num_heads=6),
    "68m": dict(num_layers=19, hidden_size=512, intermediate_size=768, num_heads=8),
    "150m": dict(num_layers=22, hidden_size=768, intermediate_size=1152, num_heads=12),
    "400m": dict(num_layers=28, hidden_size=1024, intermediate_size=2624, num_heads=16),
    "1b": dict(num_layers=28, hidden_size=1792, intermediate_size=3840, num_heads=28),
    # Learns in minutes on 2 CPU cores; layers 0 and 3 global, like the real sizes' first/last.
    # init_std 0.1 (~1/sqrt(64)), not 0.02: at width 64 the 0.02 init gives near-uniform attention
    # and the encoder sat on the unigram plateau (masked acc 0.0625 after 400 steps; 0.14 with 0.1).
    "demo": dict(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=1, init_std=0.1),
    # Unit tests: smallest shape that still has global and local layers.
    "test": dict(num_layers=4, hidden_size=64, intermediate_size=96, num_heads=4),
}


def model_args(size: str, **overrides) -> ModelArgs:
    """`ModelArgs` for a preset in SIZES, with field overrides (e.g. causal=True, vocab_size=...)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    return ModelArgs(**{**SIZES[size], **overrides})


def parameter_count(args: ModelArgs) -> dict[str, int]:
    """Closed-form parameter counts (tied embedding counted once; same for encoder and decoder).

    total = V*(H+1) + L*(4H^2 + 3HI + 2H) + H^2 + 2H   (layer 0 has no attn_norm: the -H and the
    embedding, final and head norms give the +2H; head.dense gives H^2; decoder.bias gives V).
    """
    V, H, I, L = args.vocab_size, args.hidden_size, args.intermediate_size, args.num_layers  # noqa: E741
    total = V * (H + 1) + L * (4 * H * H + 3 * H * I + 2 * H) + H * H + 2 * H
    return {"total": total, "embedding": V * H, "non_embedding": total - V * H}
