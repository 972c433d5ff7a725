"""Hugging Face side of the models: tiny checkpoints, tokenizers and processors."""
