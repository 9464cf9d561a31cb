"""Compute kernels behind small interfaces, chosen once at start-up.

Every op has a torch reference (``*_torch.py``): the CPU path and the oracle of the tests.
Faster versions live beside it: ``linear_cpu.py`` (oneDNN pre-packed weights on x86 CPUs) and
``*_triton.py`` (CUDA). GPU modules import cleanly without CUDA; they are only called on it.
"""
