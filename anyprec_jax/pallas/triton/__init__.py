"""Pallas-Triton kernels (GPUs before Hopper, and the interpreter on CPU)."""
