"""The LoRA engine."""
