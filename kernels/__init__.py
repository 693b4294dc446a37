"""Structured ops: plain references, CPU (torch) paths, Triton kernels, torch.library ops."""
