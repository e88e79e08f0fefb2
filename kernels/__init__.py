"""Triton kernels and their pure-PyTorch twins, installed as ``triton_dsl.kernels``."""
