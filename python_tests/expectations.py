"""What this run must not skip: expected backends and the C++ library's origin.

CI sets DEFINE_KERNELS_EXPECT (comma-separated backend names, e.g. "cpu_cpp,triton" on CPU,
"cpu_cpp,triton,cuda" on a GPU machine). An expected backend that cannot run fails the tests that
need it instead of skipping them, whatever the cause: a failed build, DEFINE_KERNELS_NO_JIT=1,
TRITON_INTERPRET=0 on a GPU-less machine, an import error in a kernel module.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import List, Optional

ENV_EXPECT = "DEFINE_KERNELS_EXPECT"
REPO = Path(__file__).resolve().parents[1]


def expected_backends() -> List[str]:
    return [name.strip() for name in os.environ.get(ENV_EXPECT, "").split(",") if name.strip()]


def is_expected(name: str) -> bool:
    return name in expected_backends()


def cpp_library_origin_problem() -> Optional[str]:
    """Why the loaded C++ library may not be the one built from this checkout's csrc/, or None.

    A prebuilt library (DEFINE_KERNELS_LIB, an importable define_kernels._C, another csrc via
    DEFINE_KERNELS_CSRC) would hide a broken csrc/ from every C++ test.
    """
    from define_kernels.backends import cpp_build, cpp_library
    if os.environ.get(cpp_library.ENV_LIB):
        return f"{cpp_library.ENV_LIB} is set: tests would use that library, not this checkout's csrc/"
    if importlib.util.find_spec("define_kernels._C") is not None:
        return "define_kernels._C is importable (an ahead-of-time build) and would be loaded instead of csrc/"
    csrc = cpp_build.csrc_dir().resolve()
    if csrc != REPO / "csrc":
        return f"the JIT build compiles {csrc}, not this checkout's {REPO / 'csrc'}"
    state = cpp_library.load_library()
    if state.reason is None and not (state.source or "").startswith("jit:"):
        return f"the C++ library was loaded from {state.source}, not built from {REPO / 'csrc'}"
    return None
