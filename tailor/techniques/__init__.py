"""Step 3: fine-tuning techniques, one recipe module each."""
