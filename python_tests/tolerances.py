"""The one tolerance table, and asserts that report where and by how much results differ.

fp64 and fp32: close to torch.testing defaults. fp16/bf16 follow flash-attention's rule: a
backend may be at most twice as far from the fp64 reference as the reference itself run in that
dtype, plus a floor (`assert_low_precision_close`).
"""
import torch

# One table for the tests and the backends' guarded first use (which runs in users' processes).
from define_kernels.backends.first_use_check import ATOL, LOW_PRECISION_FLOOR, RTOL  # noqa: E402,F401


def _describe(actual, expected, name):
    diff = (actual.double() - expected.double()).abs()
    worst = int(diff.argmax()) if diff.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
    return (f"{name}: max abs diff {diff.max().item() if diff.numel() else 0:.3e} at {index} "
            f"(actual {actual.reshape(-1)[worst].item() if diff.numel() else None}, "
            f"expected {expected.reshape(-1)[worst].item() if diff.numel() else None}), "
            f"{int((diff > 0).sum())} of {diff.numel()} elements differ")


def assert_close(actual, expected, dtype=None, name="tensor"):
    """assert_close with the table's tolerance for `dtype` (default: actual's dtype)."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL[dtype], rtol=RTOL[dtype],
                               msg=lambda _: _describe(actual, expected, name))


def assert_low_precision_close(actual, exact, reference_in_dtype, name="tensor"):
    """|actual - exact| <= 2 |reference_in_dtype - exact| + floor, elementwise max (fp16/bf16)."""
    dtype = actual.dtype
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    error = (actual.double() - exact.double()).abs().max().item() if actual.numel() else 0.0
    ref_error = (reference_in_dtype.double() - exact.double()).abs().max().item() if actual.numel() else 0.0
    bound = 2 * ref_error + LOW_PRECISION_FLOOR[dtype]
    assert error <= bound, f"{_describe(actual, exact, name)}; bound {bound:.3e} (reference error {ref_error:.3e})"


def assert_close_scaled(actual, expected, dtype=None, name="tensor"):
    """assert_close relative to the tensor's largest magnitude (at least 1): gradients are sums
    over tokens, so their error grows with their size, not with the table's absolute floor."""
    norm = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
    assert_close(actual / norm, expected / norm, dtype or actual.dtype, name=name)
