"""The prefill role: compute prompts and stream their KV, layer by layer, into decode workers."""
