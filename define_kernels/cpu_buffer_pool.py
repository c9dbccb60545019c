"""The CPU backend's buffer pool (csrc/cpu/buffer_pool.h).

cpu_cpp takes the "save" policy's activations and each call's scratch rows from a pool of
buffers that it hands out again once no tensor holds them any more, so a training step writes
into memory that is already mapped instead of page-faulting a fresh 70 MB (fp32, wt103-base) in
again whenever the C library has returned it to the system. Free buffers are kept up to a limit
(512 MiB by default; least recently used released first).

    set_limit(bytes)   largest total of free buffers kept; 0 turns pooling off
    clear()            releases every free buffer
    held_bytes()       bytes held, free and in use
"""
from __future__ import annotations

import torch

from .backends import cpp_library


def set_limit(bytes: int) -> None:
    """Largest total of free buffers kept (0: no pooling, and the free buffers are released).
    Loads (and on first use builds) the C++ library; raises RuntimeError when it is unavailable."""
    if cpp_library.load_library().reason is not None:
        raise RuntimeError(f"the C++ library is unavailable: {cpp_library.unavailable_reason()}")
    torch.ops.define_kernels_C.buffer_pool_set_limit(int(bytes))


def clear() -> None:
    """Releases every free buffer; tensors still in use keep theirs. A no-op without the library."""
    if cpp_library.loaded():
        torch.ops.define_kernels_C.buffer_pool_clear()


def held_bytes() -> int:
    """Bytes the pool holds, free and in use (0 without the library)."""
    return int(torch.ops.define_kernels_C.buffer_pool_bytes()) if cpp_library.loaded() else 0
