"""Hugging Face transformers: models and tokenizers from local directories, data files, fine-tune jobs."""
