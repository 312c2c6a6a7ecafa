"""CUDA kernel sources (package data: streamkv.kernels_cuda)."""
