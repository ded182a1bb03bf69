"""The Ettin transformer (encoder and decoder share it), its size presets and attention backends."""

from ettin.model.attention import Varlen, attention_backend, unpad
from ettin.model.model import EttinModel, EttinOutput, next_token_positions
from ettin.model.sizes import SIZES, ModelArgs, model_args, parameter_count

__all__ = [
    "SIZES",
    "EttinModel",
    "EttinOutput",
    "ModelArgs",
    "Varlen",
    "attention_backend",
    "model_args",
    "next_token_positions",
    "parameter_count",
    "unpad",
]
