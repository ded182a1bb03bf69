"""Conversion to and from the Hugging Face ModernBERT formats."""

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
