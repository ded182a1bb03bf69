"""Model FLOPs per token (for throughput and MFU), and the peak bf16 FLOP/s of known GPUs.

The count is the standard one: 2 FLOPs per multiply-accumulate of every matmul with a weight,
plus the attention scores (QK^T) and the weighted values (AV) over the keys each query really
sees, and 3x the forward pass for training (backward = 2x forward). Norms, activations, RoPE,
softmax and the loss are left out (a few percent at most). The formula is written out in
the README, "Performance".
"""

from __future__ import annotations

from typing import Any

import torch

# Dense (non-sparse) bf16 tensor-core peaks per GPU, from the vendor datasheets.
_PEAK_BF16 = (
    ("h200", None, 989e12),
    ("h100", "pcie", 756e12),
    ("h100", "nvl", 835e12),
    ("h100", None, 989e12),  # SXM (HBM3)
    ("a100", None, 312e12),
)


def mean_keys(seq_len: int, before: int, after: int) -> float:
    """Mean number of keys per query when query i sees keys [i - before, i + after] of a sequence.

    Keys outside the sequence are not counted: a global bidirectional layer gives `seq_len`, a
    global causal layer (seq_len + 1) / 2, and a window shorter than the sequence its own width
    minus what falls off the two ends.
    """
    if seq_len <= 0:
        return 0.0

    def clipped_sum(w: int) -> int:  # sum over i in [0, seq_len) of min(i, w)
        w = min(w, seq_len - 1)
        return w * (w + 1) // 2 + (seq_len - 1 - w) * w

    return 1.0 + (clipped_sum(before) + clipped_sum(after)) / seq_len


def _field(args: Any, name: str) -> Any:
    if not hasattr(args, name):
        raise TypeError(
            f"flops_per_token needs model args with a '{name}' field (got {type(args).__name__})"
        )
    return getattr(args, name)


def flops_per_token(
    args: Any,
    seq_len: int,
    *,
    causal: bool | None = None,
    training: bool = True,
    mlm_probability: float = 1.0,
) -> float:
    """FLOPs per real token of one ettin model on sequences of `seq_len` tokens.

    `args` is an `ettin.model.ModelArgs` (any object with its fields works). `causal` defaults to
    `args.causal`. `mlm_probability` is the fraction of positions that go through the head and
    the vocabulary projection (MLM scores only masked positions); 1.0 counts every position.
    Global layers (index % global_attn_every_n_layers == 0) see the whole sequence; local layers
    see +-local_attention/2 (encoder) or themselves and local_attention/2 - 1 earlier tokens
    (decoder).
    """
    num_layers = int(_field(args, "num_layers"))
    hidden = int(_field(args, "hidden_size"))
    inter = int(_field(args, "intermediate_size"))
    vocab = int(_field(args, "vocab_size"))
    every = int(_field(args, "global_attn_every_n_layers"))
    window = int(_field(args, "local_attention"))
    causal = bool(_field(args, "causal")) if causal is None else causal
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability={mlm_probability} must be in [0, 1]")

    # Weight matmuls per layer: Wqkv (H -> 3H), attn Wo (H -> H), Wi (H -> 2I), mlp Wo (I -> H).
    layer_weights = 2 * (
        3 * hidden * hidden + hidden * hidden + 2 * hidden * inter + inter * hidden
    )
    # Head dense (H -> H) and the tied vocabulary projection (H -> V), on scored positions only.
    head = 2 * (hidden * hidden + hidden * vocab) * mlm_probability

    if causal:
        global_keys = mean_keys(seq_len, seq_len, 0)
        local_keys = mean_keys(seq_len, window // 2 - 1, 0)
    else:
        global_keys = mean_keys(seq_len, seq_len, seq_len)
        local_keys = mean_keys(seq_len, window // 2, window // 2)
    num_global = sum(1 for i in range(num_layers) if i % every == 0)
    keys = num_global * global_keys + (num_layers - num_global) * local_keys
    attention = 2 * 2 * hidden * keys  # QK^T and AV, each 2 * keys * (heads * head_dim)

    forward = num_layers * layer_weights + attention + head
    return 3.0 * forward if training else forward


def peak_flops_from_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its `torch.cuda.get_device_name()`; None if unknown."""
    name = name.lower()
    for model, variant, peak in _PEAK_BF16:
        if model in name and (variant is None or variant in name):
            return peak
    return None


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the current CUDA device); None on CPU or unknown GPUs."""
    device = torch.device(device) if device is not None else None
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_from_name(torch.cuda.get_device_name(device))
