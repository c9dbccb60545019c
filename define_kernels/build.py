"""`python -m define_kernels.build [--verbose]`: build (or find) the C++ extension ahead of first use.

Prints the sources, the CUDA toolkit found (or why none), the CUDA arch list, which library was
loaded and where; `--verbose` shows the compiler output of a JIT build. Exits with status 1 when
the extension is unavailable, and with status 2 under `--require-cuda` when it loaded without its
CUDA kernels (CI of a CUDA torch uses this, so a silent CPU-only build cannot pass).
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m define_kernels.build", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail (exit 2) unless the CUDA kernels are compiled in")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["DEFINE_KERNELS_VERBOSE_BUILD"] = "1"
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from .backends import cpp_build, cpp_library, cuda_toolkit  # after the environment is set

    print(f"sources: {cpp_build.csrc_dir()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"CUDA toolkit: {cuda_toolkit.describe()}")
    reason = cpp_build.cuda_build_reason()
    print(f"CUDA sources: {reason or 'compiled for TORCH_CUDA_ARCH_LIST=' + cpp_build.cuda_arch_list()}")
    state = cpp_library.load_library()
    if state.reason:
        print(f"define_kernels_C unavailable: {state.reason}", file=sys.stderr)
        return 1
    source = state.source
    print(f"define_kernels_C loaded from {source[4:] if source.startswith('jit:') else source}")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"{cpp_build.EXT_NAME}::hgt_forward", "CUDA")
    print(f"CUDA kernels registered: {has_cuda}")
    if args.require_cuda and not has_cuda:
        print(f"--require-cuda: the library has no CUDA kernels ({reason or 'built without them'})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
