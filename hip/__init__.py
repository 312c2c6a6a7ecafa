"""HIP kernel sources (package data: streamkv.kernels_hip)."""
