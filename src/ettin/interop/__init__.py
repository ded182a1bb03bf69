"""Conversion to and from the Hugging Face ModernBERT formats and the reference checkpoints.

Importing the package registers the reference training's checkpoint layout with
`ettin.checkpoint` (`ettin.interop.reference.REFERENCE_FORMAT`), so `read_checkpoint` of any
caller that uses the interop package accepts reference checkpoints.
"""

from ettin.interop import reference  # noqa: F401  (registers REFERENCE_FORMAT)
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
    "load_hf_state_dict",
    "read_hf_config",
    "to_hf_state_dict",
    "training_tokenizer",
]
