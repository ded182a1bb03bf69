"""Conversion to and from the Hugging Face ModernBERT formats."""

from ettin.interop.hf import (
    check_tokenizer,
    export_hf,
    from_hf_state_dict,
    hf_config,
    import_hf,
    load_hf_state_dict,
    to_hf_state_dict,
)

__all__ = [
    "check_tokenizer",
    "export_hf",
    "from_hf_state_dict",
    "hf_config",
    "import_hf",
    "load_hf_state_dict",
    "to_hf_state_dict",
]
