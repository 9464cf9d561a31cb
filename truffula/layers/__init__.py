"""Building blocks shared by every model: linears, norms, rotary embeddings, attention, LoRA.

Each layer computes through the kernels bound at start-up (``bind.bind_kernels``); until then,
the torch reference (the CPU path).
"""
