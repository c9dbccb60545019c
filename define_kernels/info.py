"""`python -m define_kernels.info`: versions, and every backend with why it can or cannot run."""
import platform

import torch

from . import __version__
from .backends import backend_status, backends_by_priority, cuda_toolkit, get_backend


def _triton_version() -> str:
    try:
        import triton
    except ImportError as error:
        return f"not installed ({error})"
    return triton.__version__


def report() -> str:
    lines = [
        f"define_kernels {__version__}",
        f"python         {platform.python_version()}",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda}, "
        f"GPU available: {torch.cuda.is_available()})",
        f"triton         {_triton_version()}",
        f"CUDA toolkit   {cuda_toolkit.describe()}",
        f"default backend: {get_backend()}",
        "backends (by priority):",
    ]
    descriptions = {backend.name: backend.description for backend in backends_by_priority()}
    for name, reason in backend_status():
        state = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {name:10s} {state}  -- {descriptions[name]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
