"""The `torch` backend: reference.py itself, on any device and dtype. Always last in `auto`."""
import torch

from .. import reference
from .registry import Backend, register_backend

register_backend(Backend(
    name="torch",
    priority=1000,
    devices=("cpu", "cuda", "meta", "mps", "xpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    forward=reference.hgt_forward,
    backward=reference.hgt_backward,
    activation_policies=("recompute", "save"),
    forward_saving=reference.hgt_forward_saving,
    backward_saved=reference.hgt_backward_saved,
    description="pure PyTorch reference (reference.py, docs/math.md §2): gradients by autograd over a recomputed "
                "forward, or (save) from the kept activations",
))
