"""Triton kernels of the `triton` backend; imported only on first use (they import triton).

common.py: dropout hash, activations, how a group's input columns map onto x and h.
forward.py: the fused forward (one launch for the whole stack).
backward.py: the per-layer backward kernels (epilogue, weight gradient, input gradient).
"""
