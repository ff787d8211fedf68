"""Bridges to model libraries (Hugging Face transformers)."""
