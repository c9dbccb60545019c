// Pure index arithmetic of the fused HGT kernels, shared by the CUDA kernels (host and device) and
// checked on the CPU against the Python reference (python_tests/test_index_math.py builds a small
// extension from this header with the host compiler). No CUDA or torch headers: plain C++17.
//
// Math: docs/math.md (layer inputs, feature shuffle); executable form define_kernels/reference.py.
#pragma once

#include <cstdint>

#ifndef DK_HOST_DEVICE  // same definition as in dropout_hash.h
#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__
#else
#define DK_HOST_DEVICE
#endif
#endif

namespace define_kernels {

// Input kinds of a layer, the codes of the op's layer table (config.INPUT_*).
constexpr int kHgtInputX = 0;       // first layer: u = x, split into groups
constexpr int kHgtInputMix = 1;     // split-and-mix: group j = [x chunk j, h chunk j]
constexpr int kHgtInputConcat = 2;  // u = [x, h], then split into groups (a group may straddle)
constexpr int kHgtInputPrev = 3;    // no skip: u = h

// Where feature k of group j's input u_j lives, the concatenation never being built: returns true
// for column *col of the stack input x, false for column *col of the previous output h.
// p = in_dim, w_prev = previous layer's width, group_in = in_features / groups.
DK_HOST_DEVICE inline bool hgt_input_column(int kind, int p, int w_prev, int groups, int group_in, int j,
                                     int k, int* col) {
  switch (kind) {
    case kHgtInputX: *col = j * group_in + k; return true;
    case kHgtInputMix: {
      const int pg = p / groups;
      if (k < pg) { *col = j * pg + k; return true; }
      *col = j * (w_prev / groups) + (k - pg);
      return false;
    }
    case kHgtInputConcat: {
      const int u = j * group_in + k;
      if (u < p) { *col = u; return true; }
      *col = u - p;
      return false;
    }
    default: *col = j * group_in + k; return false;
  }
}

// Where features k .. k + len - 1 of group j's input lie, when they are len consecutive columns
// of one source (what a 16-byte vector load needs): kHgtSpanX / kHgtSpanH with *col the first
// column, else kHgtSpanSplit (the range straddles x and h, e.g. a mix group's x chunk ending
// inside it). Every input kind maps k to its column piecewise with slope 1 and at most one
// x -> h break, so equal sources and end columns len - 1 apart mean the range is contiguous.
constexpr int kHgtSpanH = 0;
constexpr int kHgtSpanX = 1;
constexpr int kHgtSpanSplit = -1;
DK_HOST_DEVICE inline int hgt_input_span(int kind, int p, int w_prev, int groups, int group_in, int j,
                                         int k, int len, int* col) {
  int last = 0;
  const bool first_x = hgt_input_column(kind, p, w_prev, groups, group_in, j, k, col);
  const bool last_x = hgt_input_column(kind, p, w_prev, groups, group_in, j, k + len - 1, &last);
  if (first_x != last_x || last - *col != len - 1) return kHgtSpanSplit;
  return first_x ? kHgtSpanX : kHgtSpanH;
}

// True when `address` is a multiple of `bytes` (a power of two): cp.async / 16-byte vector
// loads need the global and the shared address aligned to their size.
DK_HOST_DEVICE inline bool hgt_is_aligned(uint64_t address, uint64_t bytes) {
  return (address & (bytes - 1)) == 0;
}

// Feature shuffle after a grouped transform ([g, c] -> [c, g] flattened): output column i of group
// j is stored at this position of the layer's output.
DK_HOST_DEVICE inline int hgt_output_position(int j, int i, int groups, int per_group, int shuffle) {
  return shuffle ? i * groups + j : j * per_group + i;
}

// The inverse: the un-shuffled index (group-major, j * c + i) that output position q came from.
DK_HOST_DEVICE inline int hgt_unshuffled_index(int q, int groups, int per_group, int shuffle) {
  return shuffle ? (q % groups) * per_group + q / groups : q;
}

// Element offset of (row, col): int64 before any product, so tables and activations past 2^31
// elements (e.g. 2^27 rows x 16 columns) are addressed exactly.
DK_HOST_DEVICE inline int64_t hgt_element_offset(int64_t row, int64_t row_stride, int64_t col,
                                          int64_t col_stride) {
  return row * row_stride + col * col_stride;
}

// Number of `tile` -row tiles covering `rows` tokens.
DK_HOST_DEVICE inline int64_t hgt_num_tiles(int64_t rows, int64_t tile) { return (rows + tile - 1) / tile; }

// Persistent forward grid when the activation tiles live in a global scratch (one slice per CTA):
// all CTAs' slices together must fit `l2_budget_bytes`, so the tiles are processed in waves of
// `grid` tiles whose scratch stays L2-resident. Otherwise the grid fills the GPU
// (`sms * blocks_per_sm`). Never more CTAs than tiles, never fewer than one.
DK_HOST_DEVICE inline int64_t hgt_forward_grid(int64_t rows, int64_t tile, int64_t sms,
                                        int64_t blocks_per_sm, int scratch_in_global,
                                        int64_t scratch_per_cta_bytes, int64_t l2_budget_bytes) {
  int64_t grid = sms * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  if (scratch_in_global && scratch_per_cta_bytes > 0) {
    const int64_t fit = l2_budget_bytes / scratch_per_cta_bytes;
    grid = grid < fit ? grid : fit;
  }
  const int64_t tiles = hgt_num_tiles(rows, tile);
  grid = grid < tiles ? grid : tiles;
  return grid > 0 ? grid : 1;
}

}  // namespace define_kernels
