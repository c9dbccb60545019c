// The dropout keep-mask hash of reference.dropout_keep_mask, bit for bit (uint32 arithmetic).
//
//   draw = fmix32(fmix32(fmix32(seed ^ fmix32(layer)) ^ row_key) ^ feature) >> 8
//   keep = draw >= threshold,  threshold = int(p * 2^24)
// Plain C++ (no torch headers) so the toolkit-only CUDA kernels share it with the CPU code.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DK_HOST_DEVICE __host__ __device__
#else
#define DK_HOST_DEVICE
#endif

namespace define_kernels {

DK_HOST_DEVICE inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Per-layer part of the hash; seed is in [0, 2^31).
DK_HOST_DEVICE inline uint32_t dropout_layer_hash(int64_t seed, int64_t layer) {
  return fmix32(static_cast<uint32_t>(seed) ^ fmix32(static_cast<uint32_t>(layer)));
}

// Per-row part; row_key is the token id (ops gathering by id) or the row index.
DK_HOST_DEVICE inline uint32_t dropout_row_hash(uint32_t layer_hash, int64_t row_key) {
  return fmix32(layer_hash ^ static_cast<uint32_t>(row_key));
}

DK_HOST_DEVICE inline bool dropout_keep(uint32_t row_hash, int64_t feature, uint32_t threshold) {
  return (fmix32(row_hash ^ static_cast<uint32_t>(feature)) >> 8) >= threshold;
}

inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

}  // namespace define_kernels
