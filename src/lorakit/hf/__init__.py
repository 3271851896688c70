"""Hugging Face transformers: models and tokenizers (a directory or a hub id), data files, fine-tune jobs."""
