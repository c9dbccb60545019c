"""Finding the CUDA toolkit the C++ extension compiles against (JIT, setup.py, CMake, info).

torch.utils.cpp_extension guesses CUDA_HOME as the parent of the first `nvcc` on PATH. That
guess is wrong when that `nvcc` is a wrapper script (e.g. /usr/local/bin/nvcc running
/usr/local/cuda-13.0/bin/nvcc): the wrapper's prefix has no CUDA headers and the build dies on
`cuda_runtime.h`. Here a candidate root counts only when it holds bin/nvcc, include/cuda_runtime.h
and libcudart, and candidates come from, in order: $CUDA_HOME / $CUDA_PATH, every `nvcc` on PATH
followed through symlinks and through the absolute `.../bin/nvcc` paths a wrapper script names,
then the usual install roots. No subprocess is needed to find the root; `nvcc --version` is run
only to compare its major version with torch's.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

KNOWN_ROOTS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda", "/opt/nvidia/cuda", "/usr/lib/cuda")
_LIB_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
_WRAPPER_TARGET = re.compile(r"(/[^\s'\"`;:]+/bin/nvcc)\b")
_SCRIPT_BYTES = 64 * 1024  # a wrapper is a short script; never read a real binary whole


class Toolkit(NamedTuple):
    root: Optional[str]      # a verified toolkit root, None when none was found
    nvcc: Optional[str]      # root/bin/nvcc
    version: Optional[str]   # "13.0" from `nvcc --version`, None when unknown
    reason: Optional[str]    # why the CUDA sources cannot be built, None when they can


def missing_parts(root: Path) -> List[str]:
    """What a toolkit root lacks for building the extension (empty list: complete)."""
    missing = []
    if not (root / "bin" / "nvcc").is_file():
        missing.append("bin/nvcc")
    if not (root / "include" / "cuda_runtime.h").is_file():
        missing.append("include/cuda_runtime.h")
    if not any(glob.glob(str(root / sub / "libcudart.so*")) or (root / sub / "libcudart_static.a").is_file()
               for sub in _LIB_DIRS):
        missing.append("libcudart (lib64/, lib/ or targets/*/lib/)")
    return missing


def _wrapper_targets(nvcc: Path) -> List[Path]:
    """Absolute .../bin/nvcc paths named inside a wrapper script (empty for a real binary)."""
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(_SCRIPT_BYTES)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    text = head.decode("utf-8", "replace")
    return [Path(match) for match in _WRAPPER_TARGET.findall(text)]


def _nvcc_roots(nvcc: Path, depth: int = 0) -> Iterator[Path]:
    """Toolkit roots an `nvcc` on PATH leads to: itself resolved, then what a wrapper runs."""
    resolved = nvcc.resolve()
    yield resolved.parent.parent
    if depth < 3:  # wrappers of wrappers, never a loop
        for target in _wrapper_targets(resolved):
            yield from _nvcc_roots(target, depth + 1)


def _path_nvccs() -> Iterator[Path]:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            yield candidate


def candidate_roots() -> List[Path]:
    """Every place looked at, in order, without duplicates."""
    seen, ordered = set(), []

    def add(path: Path) -> None:
        key = str(path)
        if key not in seen:
            seen.add(key)
            ordered.append(path)

    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            add(Path(os.environ[name]))
    for nvcc in _path_nvccs():
        for root in _nvcc_roots(nvcc):
            add(root)
    for pattern in KNOWN_ROOTS:
        for match in sorted(glob.glob(pattern), reverse=True):  # newest cuda-X.Y first
            add(Path(match).resolve())
    return ordered


def nvcc_version(nvcc: str) -> Optional[str]:
    """"13.0" from `nvcc --version` ("release 13.0, V13.0.88"), None when it cannot be run."""
    try:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else None


@functools.lru_cache(maxsize=1)
def find_toolkit() -> Toolkit:
    """The toolkit to build with, or the reason there is none (cached per process)."""
    import torch
    if not torch.version.cuda:
        return Toolkit(None, None, None, "torch was built without CUDA")
    return locate(torch.version.cuda)


def locate(torch_cuda: str) -> Toolkit:
    """The first complete root of candidate_roots() whose nvcc matches torch's CUDA major version."""
    problems = []
    for root in candidate_roots():
        missing = missing_parts(root)
        if not missing:
            nvcc = str(root / "bin" / "nvcc")
            version = nvcc_version(nvcc)
            if version and version.split(".")[0] != torch_cuda.split(".")[0]:
                problems.append(f"{root}: nvcc {version}, but torch was built with CUDA "
                                f"{torch_cuda} (major versions must match)")
                continue
            return Toolkit(str(root), nvcc, version, None)
        if (root / "bin" / "nvcc").exists() or (root / "include").is_dir():
            problems.append(f"{root} has no {', '.join(missing)}")
    if not problems:
        return Toolkit(None, None, None, "nvcc not found (looked at $CUDA_HOME, $CUDA_PATH, nvcc on "
                                         "PATH and " + ", ".join(KNOWN_ROOTS) + "; set CUDA_HOME)")
    return Toolkit(None, None, None, "no complete CUDA toolkit: " + "; ".join(problems)
                   + " (set CUDA_HOME to a toolkit root)")


def use_toolkit(toolkit: Optional[Toolkit] = None) -> Toolkit:
    """Points torch.utils.cpp_extension (and child processes: ninja, nvcc) at the found root.

    cpp_extension reads CUDA_HOME once, at import, into a module constant; both are set here, so
    the JIT build and setup.py compile with the verified toolkit instead of torch's guess.
    """
    toolkit = toolkit or find_toolkit()
    if toolkit.root:
        from torch.utils import cpp_extension
        os.environ["CUDA_HOME"] = toolkit.root
        cpp_extension.CUDA_HOME = toolkit.root
    return toolkit


def describe() -> str:
    """One line for `python -m define_kernels.info` / `.build`."""
    toolkit = find_toolkit()
    if toolkit.root:
        wrapper = shutil.which("nvcc")
        via = f", nvcc on PATH: {wrapper}" if wrapper and Path(wrapper).resolve() != Path(toolkit.nvcc) else ""
        return f"{toolkit.root} (nvcc {toolkit.version or '?'}{via})"
    return f"none: {toolkit.reason}"


def nvrtc_library(root: Optional[str] = None) -> Optional[str]:
    """libnvrtc for CMake's CUDA_nvrtc_LIBRARY: the toolkit's, else the copy torch's CUDA wheel
    ships (site-packages/nvidia/cu*/lib/libnvrtc.so.*), which is the one torch itself loads."""
    root = root or find_toolkit().root
    patterns = [str(Path(root) / sub / "libnvrtc.so*") for sub in _LIB_DIRS] if root else []
    import torch
    site = Path(torch.__file__).resolve().parents[1]
    patterns += [str(site / "nvidia" / "cu*" / "lib" / "libnvrtc.so*"),
                 str(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so*")]
    for pattern in patterns:
        matches = sorted(m for m in glob.glob(pattern) if "builtins" not in m and ".alt." not in m)
        if matches:
            return matches[0]
    return None


DEFAULT_CUDA_ARCHS = "9.0;8.0"  # H100/H200 and A100 when no GPU is visible at build time


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the build: the user's, else the visible GPUs' (torch's own
    choice), else DEFAULT_CUDA_ARCHS. torch finds no arch at all on a GPU-less machine (it
    fails with an IndexError), and its sm_50 fallback elsewhere is rejected by nvcc 13. The
    CUDA kernels use no Hopper-only (sm_90a) instructions, so plain sm_90 code runs on H100/H200."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if chosen and chosen != "native":
        return chosen
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                for i in range(torch.cuda.device_count())}))
    return DEFAULT_CUDA_ARCHS


def main() -> None:
    """`python -m define_kernels.backends.cuda_toolkit`: `root;nvrtc;version` for CMake (empty
    fields when unknown), or the reason on stderr with exit status 1."""
    import sys
    toolkit = find_toolkit()
    if not toolkit.root:
        print(toolkit.reason, file=sys.stderr)
        sys.exit(1)
    print(f"{toolkit.root};{nvrtc_library(toolkit.root) or ''};{toolkit.version or ''}")


if __name__ == "__main__":
    main()
