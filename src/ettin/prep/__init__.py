"""Data preparation: corpus -> tokenizer -> chunks -> MDS shards (`ettin prep`)."""
