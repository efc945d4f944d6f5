"""Triton kernels of mexit (installed as `mexit.kernels`), each with its plain PyTorch `*_ref` beside it.

Importing a kernel module imports triton; set TRITON_INTERPRET=1 before that to run kernels on CPU tensors.
"""
