"""Compute kernels: one implementation per operation and device, chosen once at start-up.

Every operation has a torch reference, ``<op>_torch.py``: the CPU path and the oracle of the
tests. Beside it, ``<op>_triton.py`` is the CUDA version (norm, activation, rotary, attention,
LoRA, linear, token statistics) and ``linear_cpu.py`` the oneDNN pre-packed linear of x86 CPUs.
``select.py`` picks the set for a device and dtype; ``triton_support.py`` says whether Triton
can run. The Triton modules import Triton at the top and are imported only when selected, so
everything else imports cleanly without CUDA or Triton.
"""
