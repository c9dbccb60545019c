"""Integrations with other libraries; each submodule imports its library only when first used.

    define_kernels.integrations.transformers   Hugging Face models (extra [hf])
"""
import importlib

_SUBMODULES = ("transformers",)


def __getattr__(name):
    # Lazy, so `import define_kernels` never imports (or needs) an optional library.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
