// Generated from define_kernels/codes.py by `python -m define_kernels.codes`: do not edit.
// The codes of the `layers` argument of the define_kernels_C ops (7 ints per layer).
#pragma once

#include <cstdint>

namespace define_kernels {
namespace codes {

enum InputKind : int64_t { kInputX = 0, kInputMix = 1, kInputConcat = 2, kInputPrev = 3, kInputProj = 4 };
enum Act : int64_t { kActNone = 0, kActGelu = 1, kActRelu = 2, kActSilu = 3 };
constexpr int64_t kIntsPerLayer = 7;

}  // namespace codes
}  // namespace define_kernels
