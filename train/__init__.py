"""The single-GPU training loop."""
