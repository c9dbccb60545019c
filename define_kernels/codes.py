"""The integer codes of the op's layer table, defined once for Python and C++.

The C++ ops take a layer as 7 ints (contract.LayerPlan.encode); the CUDA kernels, the CPU kernels
and the Triton kernels switch on the same codes. csrc/include/define_kernels/codes.h is generated
from this module (`python -m define_kernels.codes`; python_tests/test_codes.py fails when it is
stale), so a new input kind or activation is added here and nowhere else.
"""
from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Optional


class InputKind(enum.IntEnum):
    """How a layer reads the stack input x and the previous output h (docs/math.md §2)."""
    X = 0       # first layer: u = x
    MIX = 1     # split-and-mix: per group j, chunk j of x then chunk j of h
    CONCAT = 2  # plain concatenation [x, h] (define_nomix, the output layer)
    PREV = 3    # no skip: u = h
    PROJ = 4    # the in-proj (layer 0 only): reads the op's input; its output is every later x

    @property
    def label(self) -> str:
        """The name HGTConfig.layers uses ("x", "mix", ...)."""
        return self.name.lower()

    @classmethod
    def of(cls, label: str) -> "InputKind":
        return cls[label.upper()]


class Activation(enum.IntEnum):
    NONE = 0
    GELU = 1  # exact (erf) form
    RELU = 2
    SILU = 3

    @property
    def label(self) -> Optional[str]:
        """The name HGTConfig takes (None for no activation)."""
        return None if self is Activation.NONE else self.name.lower()

    @classmethod
    def of(cls, label: Optional[str]) -> "Activation":
        return cls.NONE if label is None else cls[label.upper()]


# A layer of the C++ ops' `layers` argument: in_features, out_features, groups, input kind,
# has_norm (0/1), activation, and the layer's dropout probability as the int64 of its float64 bits.
INTS_PER_LAYER = 7

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "define_kernels" / "codes.h"


def _enum_line(name: str, prefix: str, codes) -> str:
    values = ", ".join(f"{prefix}{code.name.title()} = {int(code)}" for code in codes)
    return f"enum {name} : int64_t {{ {values} }};"


def header_text() -> str:
    """codes.h: the enums above for the CPU and CUDA sources (plain C++, no torch)."""
    return "\n".join([
        "// Generated from define_kernels/codes.py by `python -m define_kernels.codes`: do not edit.",
        "// The codes of the `layers` argument of the define_kernels_C ops (7 ints per layer).",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace define_kernels {",
        "namespace codes {",
        "",
        _enum_line("InputKind", "kInput", InputKind),
        _enum_line("Act", "kAct", Activation),
        f"constexpr int64_t kIntsPerLayer = {INTS_PER_LAYER};",
        "",
        "}  // namespace codes",
        "}  // namespace define_kernels",
        "",
    ])


def main(argv) -> int:
    """Writes codes.h (or, with --check, exits 1 when it differs from header_text())."""
    current = HEADER.read_text() if HEADER.is_file() else None
    if "--check" in argv:
        if current != header_text():
            print(f"{HEADER} is stale: run python -m define_kernels.codes")
            return 1
        return 0
    if current != header_text():
        HEADER.write_text(header_text())
        print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
