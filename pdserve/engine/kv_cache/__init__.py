"""Paged KV cache: block bookkeeping (pure Python) kept apart from the device tensors."""
