"""Imported once by the fork server of `python -m bench.lm_head`, before any case's process is
forked from it: everything a variant would otherwise import or load on its first call (torch's
compiler stack, pulled in by custom ops and F.linear_cross_entropy's chunked path, about 190 MB;
the define_kernels_C library; the LM-head backends), so that a case's peak memory above its
start is its own tensors, not the imports of whichever variant happens to run it. No tensor
operation runs here (a process forked after OpenMP work is not safe to compute in).
"""
import importlib

import torch
import torch._dynamo  # noqa: F401

from define_kernels.backends import cpp_ext
from define_kernels.lm_head import registry

from . import lm_head_cases  # noqa: F401

for _name in ("torch.nn.modules.linear_cross_entropy", "torch.utils.cpp_extension"):
    try:
        importlib.import_module(_name)
    except ImportError:  # an older torch: the chunked variant reports itself unavailable
        pass
cpp_ext.load_library()
registry.names()  # imports the built-in backends
