"""The Ettin transformer (encoder and decoder share it), its size presets and attention backends.

The size presets are plain Python; the torch parts (`model`, `attention`) load on first use, so
`ettin sizes` and `ettin --help` answer without importing torch.
"""

import importlib

from ettin.model.sizes import SIZES, ModelArgs, model_args, parameter_count

_LAZY = {
    "EttinModel": "model",
    "EttinOutput": "model",
    "next_token_positions": "model",
    "Varlen": "attention",
    "attention_backend": "attention",
    "unpad": "attention",
}

__all__ = ["SIZES", "ModelArgs", "model_args", "parameter_count", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"ettin.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ettin.model' has no attribute {name!r}")
