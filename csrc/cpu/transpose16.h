// Transpose of a matrix of 16-bit elements (bf16 / fp16 bits): dst [cols, rows] = src [rows, cols].
//
// Why: a bf16 weight gradient u^T gz read through the transposed view u.t() runs at about half
// the rate of the same GEMM with a contiguous u^T (oneDNN's AMX kernels transpose A blocks on the
// fly), and ATen's copy of u.t() is slower still. 16 x 16 tiles are widened to 32 bits and
// transposed in AVX-512 registers where the build has AVX-512F; elsewhere, and at the edges, one
// element at a time. No torch headers: the test compiles this file into a small program.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace define_kernels::cpu {

// Elements [r0, r1) x [c0, c1) one at a time.
inline void transpose16_scalar(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t r0,
                               int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
}

#if defined(__AVX512F__)
// r[i] holds row i of a 16 x 16 tile of 32-bit lanes; afterwards r[j] holds column j.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // within 128-bit lanes: pairs of rows interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // within 128-bit lanes: 4 rows' values of one column
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {  // 128-bit lanes across groups of 4 rows
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + 4 + k], 0x88);
      t[i + 4 + k] = _mm512_shuffle_i32x4(r[i + k], r[i + 4 + k], 0xdd);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xdd);
  }
}

inline void transpose16_tile(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * lds)));
  transpose16x16_epi32(r);
  for (int j = 0; j < 16; ++j)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * ldd), _mm512_cvtepi32_epi16(r[j]));
}
#endif

// Rows [r0, r1) of src into columns [r0, r1) of dst (callers split rows across threads).
inline void transpose16_rows(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t r0,
                             int64_t r1, int64_t cols) {
  int64_t r = r0, c_end = 0;
#if defined(__AVX512F__)
  c_end = cols - cols % 16;
  for (; r + 16 <= r1; r += 16)
    for (int64_t c = 0; c < c_end; c += 16) transpose16_tile(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  transpose16_scalar(src, lds, dst, ldd, r0, r, c_end, cols);  // right edge of the full tiles
#endif
  transpose16_scalar(src, lds, dst, ldd, r, r1, 0, cols);  // the last rows (all, without AVX-512)
}

}  // namespace define_kernels::cpu
