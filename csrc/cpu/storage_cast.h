// to_storage<T>(v): v (computed in float / double) rounded to the storage type T. For bfloat16
// this is c10's round-to-nearest-even written with integer operations only: c10::BFloat16(float)
// keeps `omp simd` loops from vectorizing, which made every bf16 epilogue store scalar.
// Bit-identical to c10 for every input (NaN -> the canonical 0x7FC0, as c10).
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace define_kernels::cpu {

inline c10::BFloat16 bfloat16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(std::isnan(f) ? 0x7FC0u : rounded),
                       c10::BFloat16::from_bits());
}

template <typename T, typename A>
inline T to_storage(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    return bfloat16_rne(v);
  } else {
    return T(v);
  }
}

}  // namespace define_kernels::cpu
