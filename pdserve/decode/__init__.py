"""The decode role (and the colocated role, which is the decode role without remote prefill)."""
