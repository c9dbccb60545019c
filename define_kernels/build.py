"""`python -m define_kernels.build [--verbose]`: build (or find) the C++ extension ahead of first use.

Prints which library was loaded and where; `--verbose` shows the compiler output of a JIT build.
Exits with status 1 when the extension is unavailable.
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m define_kernels.build", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["DEFINE_KERNELS_VERBOSE_BUILD"] = "1"
        import logging
        logging.basicConfig(level=logging.INFO)
    from .backends import cpp_ext  # after the environment is set

    print(f"sources: {cpp_ext.csrc_dir()}")
    print(f"CUDA sources: {cpp_ext.cuda_build_reason() or 'compiled'}")
    state = cpp_ext.load_library()
    if state.reason:
        print(f"define_kernels_C unavailable: {state.reason}", file=sys.stderr)
        return 1
    source = state.source
    print(f"define_kernels_C loaded from {source[4:] if source.startswith('jit:') else source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
