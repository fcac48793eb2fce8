"""Data: text sources, tokenizers, tokenized shards, packing."""
