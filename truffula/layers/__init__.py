"""Building blocks shared by every model: linears, norms, rotary embeddings, attention, LoRA."""
