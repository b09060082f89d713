"""Shared test helpers: tiny random Hugging Face models built in-process."""
