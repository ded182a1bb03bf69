"""ettin: paired ModernBERT-style encoder and decoder training recipes on Composer."""

__version__ = "0.1.0"
