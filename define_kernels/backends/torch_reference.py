"""The `torch` backend: reference.py itself, on any device and dtype. Always last in `auto`.

The reference's backward uses autograd, but a custom op's implementation runs below the Autograd
dispatch key, where autograd is off. `_with_autograd` re-enables it for the call: it clears the
two thread-local key exclusions the dispatcher set (torch.func.vjp would also work there, but
trips opcheck's schema check). That is this adapter's job, so reference.py stays a plain spec.
"""
import contextlib
import functools

import torch

from .. import reference
from .registry import Backend, register_backend

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)


@contextlib.contextmanager
def autograd_below_the_op():
    """Autograd available inside a custom op's implementation, for the duration of the block."""
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in _AUTOGRAD_KEYS]
    for key in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        yield
    finally:
        for key, was_excluded in zip(_AUTOGRAD_KEYS, excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)


def _with_autograd(function):
    @functools.wraps(function)
    def run(*args):
        with autograd_below_the_op():
            return function(*args)
    return run


register_backend(Backend(
    name="torch",
    priority=1000,
    devices=("cpu", "cuda", "meta", "mps", "xpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    forward=reference.hgt_forward,
    backward=_with_autograd(reference.hgt_backward),
    activation_policies=("recompute", "save"),
    forward_saving=reference.hgt_forward_saving,
    backward_saved=_with_autograd(reference.hgt_backward_saved),
    description="pure PyTorch reference (reference.py, docs/math.md §2): gradients by autograd over a recomputed "
                "forward, or (save) from the kept activations",
))
