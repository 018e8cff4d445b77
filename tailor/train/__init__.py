"""Step 5: the fine-tuning engine (encoding, packing, the loop, checkpoints, run folders)."""
