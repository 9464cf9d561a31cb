"""LoRA adapters: PEFT reading, merging, host memory and device slots."""
