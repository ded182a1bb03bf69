"""Conversion to and from the Hugging Face ModernBERT formats and the reference checkpoints.

`read_any_checkpoint` / `load_any_checkpoint` (`formats.py`) read a checkpoint in any format
ettin knows (its own and the reference training's); `ettin.checkpoint.read_checkpoint` reads
only ettin's own and names them for any other.
"""

from ettin.interop.formats import load_any_checkpoint, read_any_checkpoint
from ettin.interop.hf import (
    check_tokenizer,
    export_hf,
    export_tokenizer,
    from_hf_state_dict,
    hf_config,
    import_hf,
    load_hf_state_dict,
    read_hf_config,
    to_hf_state_dict,
    training_tokenizer,
)

__all__ = [
    "check_tokenizer",
    "export_hf",
    "export_tokenizer",
    "from_hf_state_dict",
    "hf_config",
    "import_hf",
    "load_any_checkpoint",
    "load_hf_state_dict",
    "read_any_checkpoint",
    "read_hf_config",
    "to_hf_state_dict",
    "training_tokenizer",
]
