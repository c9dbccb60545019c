// CUDA kernels of the fused HGT op. Layout of this file:
//   1. scalar helpers: dtype conversion, the dropout hash, activations
//   2. cta_gemm: one CTA computes a 64 x 64 fp32 tile of A @ B from element loaders
//      (tensor cores via WMMA for fp16/bf16, fp32 FMA for float)
//   3. layer input addressing: mix / concat / shuffle folded into index math, never materialized
//   4. the one-pass forward kernel (also the activation-saving forward of the backward)
//   5. backward kernels: LN/act/dropout backward, dX and dW grouped GEMMs, fixed-order reductions
//   6. host launchers and explicit instantiations
// Math contract: define_kernels/reference.py. Design: bench/gpu_cuda_notes.md.
#include "hgt_kernels.cuh"

#include <define_kernels/dropout_hash.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>

namespace dk_cuda {
namespace {

constexpr int kThreads = 256;                 // 8 warps per CTA in every kernel
constexpr int kBM = 64, kBN = 64, kBK = 32;   // cta_gemm tile; kBM is also the forward token tile
constexpr int kPadAB = 8;                     // keeps WMMA rows 32-byte aligned, spreads banks
constexpr int kPadC = 4;
constexpr float kLnEps = 1e-5f;

#define DK_CUDA_TRY(expr)                          \
  do {                                             \
    cudaError_t dk_status_ = (expr);               \
    if (dk_status_ != cudaSuccess) return dk_status_; \
  } while (0)

// ------------------------------------------------------------------------ 1. scalar helpers
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Tensor cores for 16-bit types; bf16 WMMA needs sm_80, older targets take the FMA path.
template <typename T> struct UseTensorCores { static constexpr bool value = false; };
template <> struct UseTensorCores<__half> { static constexpr bool value = true; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <> struct UseTensorCores<__nv_bfloat16> { static constexpr bool value = true; };
#endif

// Bit-exact with reference.dropout_keep_mask (the hash is shared with the CPU code).
__device__ __forceinline__ bool keep_feature(const HgtStack& st, int layer, uint32_t row_key,
                                             uint32_t feature) {
  const uint32_t row_hash = define_kernels::dropout_row_hash(
      define_kernels::dropout_layer_hash(st.seed, layer), row_key);
  return define_kernels::dropout_keep(row_hash, feature, st.drop_threshold);
}

// Table row of token t (the Map lookup) and its dropout key (token id, or row index when dense).
__device__ __forceinline__ int64_t table_row(const HgtRows& in, int64_t t) {
  if (in.ids == nullptr) return t;
  return in.ids_are_64bit ? static_cast<const int64_t*>(in.ids)[t]
                          : static_cast<int64_t>(static_cast<const int32_t*>(in.ids)[t]);
}
__device__ __forceinline__ uint32_t row_key(const HgtRows& in, int64_t t) {
  return static_cast<uint32_t>(table_row(in, t));  // uint32 wrap, as `& 0xFFFFFFFF` in Python
}

__device__ __forceinline__ float act_forward(int act, float v) {
  switch (act) {
    case kActGelu: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));  // exact erf form
    case kActRelu: return v > 0.f ? v : 0.f;
    case kActSilu: return v / (1.f + expf(-v));
    default: return v;
  }
}

__device__ __forceinline__ float act_grad(int act, float v) {
  switch (act) {
    case kActGelu:
      return 0.5f * (1.f + erff(v * 0.7071067811865476f)) + v * 0.3989422804014327f * expf(-0.5f * v * v);
    case kActRelu: return v > 0.f ? 1.f : 0.f;
    case kActSilu: {
      const float s = 1.f / (1.f + expf(-v));
      return s * (1.f + v * (1.f - s));
    }
    default: return 1.f;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Mean and 1/std (fp32) of one LayerNorm group's c values, each lane of a warp taking every
// 32nd value; forward and backward must agree on these bit for bit.
template <typename T>
__device__ __forceinline__ float2 warp_group_moments(const T* zr, int c, int lane) {
  float sum = 0.f;
  for (int i = lane; i < c; i += 32) sum += to_float(zr[i]);
  const float mean = warp_sum(sum) / c;
  float sq = 0.f;
  for (int i = lane; i < c; i += 32) {
    const float d = to_float(zr[i]) - mean;
    sq += d * d;
  }
  return make_float2(mean, rsqrtf(warp_sum(sq) / c + kLnEps));
}

// ------------------------------------------------------------------------ 2. cta_gemm
template <typename T>
struct GemmSmem {
  alignas(32) T a[kBM][kBK + kPadAB];
  alignas(32) T b[kBK][kBN + kPadAB];
  alignas(32) float c[kBM][kBN + kPadC];  // the fp32 result tile the caller's epilogue reads
};

// Copies an R x C tile into shared memory through `load(row, col)` (which zero-fills outside the
// operand). kRowFastest picks which index consecutive threads walk, to keep global reads coalesced.
template <int R, int C, bool kRowFastest, typename T, typename Load>
__device__ __forceinline__ void stage_tile(T* dst, int ld, const Load& load, int row_off, int col_off) {
  for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
    const int r = kRowFastest ? idx % R : idx / C;
    const int c = kRowFastest ? idx / R : idx % C;
    dst[r * ld + c] = load(r + row_off, c + col_off);
  }
}

// s.c = A[0:64, 0:K] @ B[0:K, 0:64] in fp32. load_a(m, k) and load_b(k, n) return T and handle
// every mask and every layout (mix, concat, transposes), so one GEMM body serves all five uses.
// Ends with a barrier: s.c is ready for all threads.
template <typename T, typename LoadA, typename LoadB>
__device__ void cta_gemm(GemmSmem<T>& s, int K, const LoadA& load_a, const LoadB& load_b) {
  if constexpr (UseTensorCores<T>::value) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp % 4, wn = warp / 4;  // 4 x 2 warps, each a 16 x 32 strip
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int k0 = 0; k0 < K; k0 += kBK) {
      stage_tile<kBM, kBK, LoadA::kRowFastest>(&s.a[0][0], kBK + kPadAB, load_a, 0, k0);
      stage_tile<kBK, kBN, LoadB::kRowFastest>(&s.b[0][0], kBN + kPadAB, load_b, k0, 0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &s.a[wm * 16][kk], kBK + kPadAB);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, &s.b[kk][wn * 32 + f * 16], kBN + kPadAB);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(&s.c[wm * 16][wn * 32 + f * 16], acc[f], kBN + kPadC, wmma::mem_row_major);
  } else {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 4 x 4 outputs per thread
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kBK) {
      stage_tile<kBM, kBK, LoadA::kRowFastest>(&s.a[0][0], kBK + kPadAB, load_a, 0, k0);
      stage_tile<kBK, kBN, LoadB::kRowFastest>(&s.b[0][0], kBN + kPadAB, load_b, k0, 0);
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kBK; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = to_float(s.a[ty * 4 + i][kk]);
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = to_float(s.b[kk][tx * 4 + j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s.c[ty * 4 + i][tx * 4 + j] = acc[i][j];
  }
  __syncthreads();
}

// ------------------------------------------------------------------------ 3. layer input addressing
// u of a layer, viewed per group: feature k of group j comes from the stack input x or from the
// previous output h. Row r lives at x + r * ldx and h + r * ldh (tile-relative in the forward,
// absolute in the backward).
template <typename T>
struct LayerInput {
  const T* x;
  int64_t ldx;
  const T* h;
  int64_t ldh;
  int kind, p, w_prev, groups, group_in;  // group_in = in_features / groups

  // true: column *col of x; false: column *col of h.
  __device__ __forceinline__ bool from_x(int j, int k, int* col) const {
    switch (kind) {
      case kInputX: *col = j * group_in + k; return true;
      case kInputMix: {  // group j = [x chunk j, h chunk j]
        const int pg = p / groups;
        if (k < pg) { *col = j * pg + k; return true; }
        *col = j * (w_prev / groups) + (k - pg);
        return false;
      }
      case kInputConcat: {  // u = [x, h], then split into groups
        const int u = j * group_in + k;
        if (u < p) { *col = u; return true; }
        *col = u - p;
        return false;
      }
      default: *col = j * group_in + k; return false;  // kInputPrev
    }
  }
  __device__ __forceinline__ T load(int64_t r, int j, int k) const {
    int col;
    return from_x(j, k, &col) ? x[r * ldx + col] : h[r * ldh + col];
  }
};

// Forward A operand: A(m, k) = u_j[tile row m, feature k].
template <typename T>
struct InputRowsLoader {
  static constexpr bool kRowFastest = false;
  LayerInput<T> in;
  int j, rows, K;
  __device__ __forceinline__ T operator()(int m, int k) const {
    return (m < rows && k < K) ? in.load(m, j, k) : from_float<T>(0.f);
  }
};

// B(k, n) = W_j[k, n0 + n] (forward), W_j row-major [K, c].
template <typename T>
struct WeightLoader {
  static constexpr bool kRowFastest = false;
  const T* w;
  int K, c, n0;
  __device__ __forceinline__ T operator()(int k, int n) const {
    const int col = n0 + n;
    return (k < K && col < c) ? w[static_cast<int64_t>(k) * c + col] : from_float<T>(0.f);
  }
};

// ------------------------------------------------------------------------ 4. forward
template <typename T>
struct ForwardArgs {
  HgtStack st;
  HgtRows in;
  T* y;
  T* scratch;               // per-CTA activation tiles when they do not fit in shared memory
  int64_t scratch_per_cta;  // elements
  int acts_in_smem;
  int save;                 // backward's forward: keep x, z and h of every layer in global memory
  T* save_x;
  T* save_z[kMaxLayers];
  T* save_h[kMaxLayers];
};

// Per-group LayerNorm (fp32 statistics, two passes over the row), activation and dropout on the
// tile's pre-norm rows z; writes h (may alias z: each element is read and written by one lane).
template <typename T>
__device__ void norm_act_dropout(const HgtStack& st, const HgtRows& in, int l, const T* z, T* h,
                                 int nrows, int64_t row0) {
  const HgtLayer& L = st.layers[l];
  const int w = L.out_features, c = w / L.groups;
  auto finish = [&](int r, int q, float v) {
    v = act_forward(L.act, v);
    if (st.dropout_on)
      v = keep_feature(st, l, row_key(in, row0 + r), static_cast<uint32_t>(q)) ? v / st.keep_prob : 0.f;
    h[static_cast<int64_t>(r) * w + q] = from_float<T>(v);
  };
  if (!L.has_norm) {
    for (int idx = threadIdx.x; idx < nrows * w; idx += kThreads)
      finish(idx / w, idx % w, to_float(z[static_cast<int64_t>(idx / w) * w + idx % w]));
    return;
  }
  const T* gamma = static_cast<const T*>(L.norm_weight);
  const T* beta = static_cast<const T*>(L.norm_bias);
  const int lane = threadIdx.x % 32;
  for (int pair = threadIdx.x / 32; pair < nrows * L.groups; pair += kThreads / 32) {
    const int r = pair / L.groups, q0 = (pair % L.groups) * c;  // LN group = c consecutive outputs
    const T* zr = z + static_cast<int64_t>(r) * w + q0;
    const float2 moments = warp_group_moments(zr, c, lane);
    const float mean = moments.x, rstd = moments.y;
    for (int i = lane; i < c; i += 32)
      finish(r, q0 + i, (to_float(zr[i]) - mean) * rstd * to_float(gamma[i]) + to_float(beta[i]));
  }
}

// One launch for the whole stack. Each CTA loops over 64-token tiles (persistent grid); per tile it
// gathers the scaled map rows once, then runs every layer on the tile: grouped GEMM (+bias, output
// columns written at their shuffled position), then LN/act/dropout per row. Activations stay in
// shared memory when 64 x (p + 2 max_width) fits, else in this CTA's slice of a global scratch that
// the small persistent grid keeps L2-resident.
template <typename T>
__global__ void __launch_bounds__(kThreads) hgt_forward_kernel(const __grid_constant__ ForwardArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  GemmSmem<T>& gs = *reinterpret_cast<GemmSmem<T>*>(smem_raw);
  const HgtStack& st = a.st;
  const int p = st.in_dim;
  T* acts = a.save ? nullptr
          : a.acts_in_smem ? reinterpret_cast<T*>(smem_raw + sizeof(GemmSmem<T>))
                           : a.scratch + blockIdx.x * a.scratch_per_cta;
  const int64_t num_tiles = (a.in.rows + kBM - 1) / kBM;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kBM;
    const int nrows = static_cast<int>(min(static_cast<int64_t>(kBM), a.in.rows - row0));
    T* xs = a.save ? a.save_x + row0 * p : acts;
    const T* table = static_cast<const T*>(a.in.x);
    for (int idx = threadIdx.x; idx < nrows * p; idx += kThreads) {
      const int r = idx / p, col = idx % p;
      const T v = table[table_row(a.in, row0 + r) * a.in.x_stride0 + col * a.in.x_stride1];
      xs[idx] = from_float<T>(to_float(v) * st.scale);  // rounded to T, as rows * scale is
    }
    __syncthreads();
    const T* h_prev = nullptr;
    int w_prev = 0;
    for (int l = 0; l < st.num_layers; ++l) {
      const HgtLayer& L = st.layers[l];
      const int w = L.out_features, g = L.groups, K = L.in_features / g, c = w / g;
      T* z;
      T* h;
      if (a.save) {
        z = a.save_z[l] + row0 * w;
        h = a.save_h[l] + row0 * w;
      } else {  // ping-pong: layer l writes buffer l % 2 while it reads h_prev from the other one
        z = acts + kBM * p + (l & 1) * kBM * st.max_width;
        h = (l + 1 == st.num_layers) ? a.y + row0 * w : z;
      }
      const LayerInput<T> u{xs, p, h_prev, w_prev, L.input_kind, p, w_prev, g, K};
      const T* weight = static_cast<const T*>(L.weight);
      const T* bias = static_cast<const T*>(L.bias);
      for (int j = 0; j < g; ++j) {
        for (int n0 = 0; n0 < c; n0 += kBN) {
          cta_gemm(gs, K, InputRowsLoader<T>{u, j, nrows, K},
                   WeightLoader<T>{weight + static_cast<int64_t>(j) * K * c, K, c, n0});
          for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
            const int m = idx / kBN, col = n0 + idx % kBN;
            if (m >= nrows || col >= c) continue;
            const float v = gs.c[m][idx % kBN] + to_float(bias[j * c + col]);
            const int q = st.shuffle ? col * g + j : j * c + col;  // [g, c] -> [c, g] flattened
            z[static_cast<int64_t>(m) * w + q] = from_float<T>(v);
          }
          __syncthreads();  // s.c and z complete before the next GEMM / the row pass
        }
      }
      norm_act_dropout(st, a.in, l, z, h, nrows, row0);
      __syncthreads();
      h_prev = h;
      w_prev = w;
    }
  }
}

// ------------------------------------------------------------------------ 5. backward
// dL/dz (pre-norm, written un-shuffled so the GEMMs see plain groups) for rows [r0, r1) of one
// layer, from dL/dh, recomputing LN statistics and dropout masks from the saved z. Also the CTA's
// partial sums of d(bias), d(norm weight), d(norm bias), reduced later in a fixed order.
template <typename T, typename G>
struct DzArgs {
  HgtStack st;
  HgtRows in;
  int layer;
  const T* z;
  const G* dh;        // grad_y (T) for the last layer, the fp32 accumulator otherwise
  T* dz;
  float* stats;       // [rows, groups, 4]: mean, rstd, sum(dxhat), sum(dxhat * xhat)
  float* part_db;     // [blocks, w]
  float* part_dgamma;
  float* part_dbeta;
  int64_t rows_per_block;
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) hgt_dz_kernel(const __grid_constant__ DzArgs<T, G> a) {
  const HgtStack& st = a.st;
  const HgtLayer& L = st.layers[a.layer];
  const int w = L.out_features, g = L.groups, c = w / g;
  const int64_t r0 = blockIdx.x * a.rows_per_block;
  const int64_t r1 = min(a.in.rows, r0 + a.rows_per_block);
  const T* gamma = static_cast<const T*>(L.norm_weight);
  const T* beta = static_cast<const T*>(L.norm_bias);
  auto upstream = [&](int64_t r, int q) {  // dL/d(activation output), dropout undone
    float d = to_float(a.dh[r * w + q]);
    if (st.dropout_on)
      d = keep_feature(st, a.layer, row_key(a.in, r), static_cast<uint32_t>(q)) ? d / st.keep_prob : 0.f;
    return d;
  };
  if (L.has_norm) {  // phase A: one warp per (row, LN group)
    const int lane = threadIdx.x % 32;
    for (int64_t pair = threadIdx.x / 32; pair < (r1 - r0) * g; pair += kThreads / 32) {
      const int64_t r = r0 + pair / g;
      const int q0 = static_cast<int>(pair % g) * c;
      const T* zr = a.z + r * w + q0;
      const float2 moments = warp_group_moments(zr, c, lane);
      const float mean = moments.x, rstd = moments.y;
      float s1 = 0.f, s2 = 0.f;
      for (int i = lane; i < c; i += 32) {
        const float xhat = (to_float(zr[i]) - mean) * rstd, gm = to_float(gamma[i]);
        const float dxhat = upstream(r, q0 + i) * act_grad(L.act, xhat * gm + to_float(beta[i])) * gm;
        s1 += dxhat;
        s2 += dxhat * xhat;
      }
      s1 = warp_sum(s1);
      s2 = warp_sum(s2);
      if (lane == 0) {
        float* s = a.stats + (r * g + pair % g) * 4;
        s[0] = mean; s[1] = rstd; s[2] = s1; s[3] = s2;
      }
    }
    __syncthreads();  // global writes of the block are visible to the block after the barrier
  }
  // phase B: one thread per feature walks the rows in order, so the partial sums are deterministic
  for (int q = threadIdx.x; q < w; q += kThreads) {
    const int i = q % c, jg = q / c;
    const int uq = st.shuffle ? (q % g) * c + q / g : q;  // shuffled position q came from (q%g, q/g)
    const float gm = L.has_norm ? to_float(gamma[i]) : 1.f;
    const float bt = L.has_norm ? to_float(beta[i]) : 0.f;
    float acc_db = 0.f, acc_dgamma = 0.f, acc_dbeta = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const float zq = to_float(a.z[r * w + q]);
      const float d = upstream(r, q);
      float dzq;
      if (L.has_norm) {
        const float* s = a.stats + (r * g + jg) * 4;
        const float xhat = (zq - s[0]) * s[1];
        const float da = d * act_grad(L.act, xhat * gm + bt);
        dzq = s[1] * (da * gm - (s[2] + xhat * s[3]) / c);
        acc_dgamma += da * xhat;
        acc_dbeta += da;
      } else {
        dzq = d * act_grad(L.act, zq);
      }
      a.dz[r * w + uq] = from_float<T>(dzq);
      acc_db += dzq;
    }
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * w;
    a.part_db[slot + uq] = acc_db;
    if (L.has_norm) {
      a.part_dgamma[slot + q] = acc_dgamma;
      a.part_dbeta[slot + q] = acc_dbeta;
    }
  }
}

// dW_j = U_j^T @ dZ_j, split over token chunks: CTA (m tile, n tile, j * splits + s) writes
// partial [s][j][K][c]; reduce_partials_kernel sums the splits in order (no atomics).
template <typename T>
struct WgradArgs {
  LayerInput<T> u;  // absolute rows
  const T* dz;
  int w, c, K, splits;
  int64_t rows, chunk;
  float* partial;
};

template <typename T>
struct InputColsLoader {  // A(m, k) = u_j[token t0 + k, feature m0 + m]
  static constexpr bool kRowFastest = true;
  LayerInput<T> u;
  int j, m0, K;
  int64_t t0, len;
  __device__ __forceinline__ T operator()(int m, int k) const {
    return (m0 + m < K && k < len) ? u.load(t0 + k, j, m0 + m) : from_float<T>(0.f);
  }
};

template <typename T>
struct DzRowsLoader {  // B(k, n) = dz[token t0 + k, col0 + n], n < cols
  static constexpr bool kRowFastest = false;
  const T* dz;
  int w, col0, cols;
  int64_t t0, len;
  __device__ __forceinline__ T operator()(int k, int n) const {
    return (k < len && n < cols) ? dz[(t0 + k) * w + col0 + n] : from_float<T>(0.f);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) hgt_wgrad_kernel(const __grid_constant__ WgradArgs<T> a) {
  __shared__ GemmSmem<T> gs;
  const int j = blockIdx.z / a.splits, s = blockIdx.z % a.splits;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int64_t t0 = s * a.chunk;
  const int64_t len = max(static_cast<int64_t>(0), min(a.chunk, a.rows - t0));
  cta_gemm(gs, static_cast<int>(len), InputColsLoader<T>{a.u, j, m0, a.K, t0, len},
           DzRowsLoader<T>{a.dz, a.w, j * a.c + n0, a.c - n0, t0, len});
  float* out = a.partial + (static_cast<int64_t>(s) * a.u.groups + j) * a.K * a.c;
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int m = m0 + idx / kBN, n = n0 + idx % kBN;
    if (m < a.K && n < a.c) out[static_cast<int64_t>(m) * a.c + n] = gs.c[idx / kBN][idx % kBN];
  }
}

// dU_j = dZ_j @ W_j^T, scattered back through the input addressing: x columns accumulate into the
// fp32 grad of the stack input (one writer per element per layer; layers run in sequence), h
// columns are the previous layer's dL/dh (written exactly once).
template <typename T>
struct DgradArgs {
  LayerInput<T> u;  // only its addressing is used
  const T* dz;
  const T* weight;
  int w, c, K;
  int64_t rows;
  float* grad_x;    // [rows, p]
  float* grad_h;    // [rows, w_prev]
};

template <typename T>
struct WeightTLoader {  // B(k, n) = W_j[k0 + n, k]: W^T, read along W's rows
  static constexpr bool kRowFastest = true;
  const T* w;
  int K, c, k0;
  __device__ __forceinline__ T operator()(int k, int n) const {
    return (k < c && k0 + n < K) ? w[static_cast<int64_t>(k0 + n) * c + k] : from_float<T>(0.f);
  }
};

template <typename T>
struct DzTileLoader {  // A(m, k) = dz[row0 + m, col0 + k]
  static constexpr bool kRowFastest = false;
  const T* dz;
  int w, col0, c, nrows;
  int64_t row0;
  __device__ __forceinline__ T operator()(int m, int k) const {
    return (m < nrows && k < c) ? dz[(row0 + m) * w + col0 + k] : from_float<T>(0.f);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) hgt_dgrad_kernel(const __grid_constant__ DgradArgs<T> a) {
  __shared__ GemmSmem<T> gs;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(kBM), a.rows - row0));
  const int k0 = blockIdx.y * kBN, j = blockIdx.z;
  cta_gemm(gs, a.c, DzTileLoader<T>{a.dz, a.w, j * a.c, a.c, nrows, row0},
           WeightTLoader<T>{a.weight + static_cast<int64_t>(j) * a.K * a.c, a.K, a.c, k0});
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN, k = k0 + idx % kBN;
    if (m >= nrows || k >= a.K) continue;
    const float v = gs.c[m][idx % kBN];
    int col;
    if (a.u.from_x(j, k, &col)) a.grad_x[(row0 + m) * a.u.p + col] += v;
    else a.grad_h[(row0 + m) * a.u.w_prev + col] = v;
  }
}

// out[i] = sum over splits s, then folds f, of part[s * split_stride + f * fold_stride + i].
template <typename T>
__global__ void reduce_partials_kernel(const float* part, int64_t splits, int64_t split_stride,
                                       int64_t n_out, int folds, int64_t fold_stride, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_out;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s)
      for (int f = 0; f < folds; ++f) acc += part[s * split_stride + f * fold_stride + i];
    out[i] = from_float<T>(acc);
  }
}

// grad_rows = scale * d(stack input): the gradient per gathered row.
template <typename T>
__global__ void finish_grad_rows_kernel(const float* acc, int64_t n, float scale, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(acc[i] * scale);
}

// ------------------------------------------------------------------------ 6. host side
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t bytes) { return (bytes + 255) & ~static_cast<size_t>(255); }

cudaError_t device_sms(int* sms) {
  int device = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}

int elementwise_grid(int64_t n, int sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 32LL * sms)));
}

// Backward buffers, carved from one workspace in this order. Sizes depend on the SM count (how
// many split-K / row-block partial sums keep the GPU busy), so size query and launch share this.
struct BackwardLayout {
  size_t grad_x, save_x, save_z[kMaxLayers], save_h[kMaxLayers], dh, dz, stats, dz_part, w_part;
  size_t total;
  int64_t dz_blocks, dz_rows_per_block;
  int64_t splits[kMaxLayers], chunk[kMaxLayers];
};

template <typename T>
BackwardLayout backward_layout(const HgtStack& st, int64_t rows, int sms) {
  BackwardLayout b{};
  size_t offset = 0;
  auto take = [&](size_t bytes) { const size_t at = offset; offset += align256(bytes); return at; };
  int64_t max_hidden = 1, max_groups = 1, w_part = 1;
  for (int l = 0; l < st.num_layers; ++l) {
    const HgtLayer& L = st.layers[l];
    if (l + 1 < st.num_layers) max_hidden = std::max<int64_t>(max_hidden, L.out_features);
    max_groups = std::max<int64_t>(max_groups, L.groups);
    const int K = L.in_features / L.groups, c = L.out_features / L.groups;
    const int64_t tiles = L.groups * ceil_div(K, kBM) * ceil_div(c, kBN);
    int64_t splits = std::min(ceil_div(2 * sms, tiles), std::max<int64_t>(1, ceil_div(rows, 256)));
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, 4096));
    b.chunk[l] = std::max<int64_t>(1, ceil_div(ceil_div(rows, splits), kBK) * kBK);
    b.splits[l] = std::max<int64_t>(1, ceil_div(rows, b.chunk[l]));
    w_part = std::max<int64_t>(w_part, b.splits[l] * L.in_features / L.groups * L.out_features);
  }
  b.dz_blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, 16), 8LL * sms));
  b.dz_rows_per_block = std::max<int64_t>(1, ceil_div(rows, b.dz_blocks));
  b.dz_blocks = std::max<int64_t>(1, ceil_div(rows, b.dz_rows_per_block));
  const size_t n = static_cast<size_t>(rows);
  b.grad_x = take(n * st.in_dim * sizeof(float));
  b.save_x = take(n * st.in_dim * sizeof(T));
  for (int l = 0; l < st.num_layers; ++l) {
    b.save_z[l] = take(n * st.layers[l].out_features * sizeof(T));
    b.save_h[l] = take(n * st.layers[l].out_features * sizeof(T));
  }
  b.dh = take(n * max_hidden * sizeof(float));
  b.dz = take(n * st.max_width * sizeof(T));
  b.stats = take(n * max_groups * 4 * sizeof(float));
  b.dz_part = take(3 * static_cast<size_t>(b.dz_blocks) * st.max_width * sizeof(float));
  b.w_part = take(static_cast<size_t>(w_part) * sizeof(float));
  b.total = offset;
  return b;
}

template <typename T>
cudaError_t launch_reduce(const float* part, int64_t splits, int64_t split_stride, int64_t n_out,
                          int folds, int64_t fold_stride, void* out, int sms, cudaStream_t stream) {
  reduce_partials_kernel<T><<<elementwise_grid(n_out, sms), kThreads, 0, stream>>>(
      part, splits, split_stride, n_out, folds, fold_stride, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t launch_dz(const HgtStack& st, const HgtRows& in, int l, const T* z, const G* dh, T* dz,
                      char* ws, const BackwardLayout& b, cudaStream_t stream) {
  float* part = reinterpret_cast<float*>(ws + b.dz_part);
  const int64_t part_stride = b.dz_blocks * st.max_width;
  DzArgs<T, G> args{st, in, l, z, dh, dz, reinterpret_cast<float*>(ws + b.stats),
                    part, part + part_stride, part + 2 * part_stride, b.dz_rows_per_block};
  hgt_dz_kernel<T, G><<<static_cast<unsigned>(b.dz_blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t plan_hgt_forward(const HgtStack& st, int64_t rows, HgtForwardPlan* plan) {
  int sms = 0, device = 0, optin = 0, per_sm = 0;
  DK_CUDA_TRY(device_sms(&sms));
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t acts = static_cast<size_t>(kBM) * (st.in_dim + 2 * static_cast<size_t>(st.max_width)) * sizeof(T);
  plan->acts_in_smem = sizeof(GemmSmem<T>) + acts <= static_cast<size_t>(optin);
  plan->smem_bytes = sizeof(GemmSmem<T>) + (plan->acts_in_smem ? acts : 0);
  DK_CUDA_TRY(cudaFuncSetAttribute(hgt_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(plan->smem_bytes)));
  DK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hgt_forward_kernel<T>, kThreads,
                                                            plan->smem_bytes));
  // Global-scratch mode: at most 2 CTAs per SM, so grid x tile scratch stays within L2.
  per_sm = std::max(1, plan->acts_in_smem ? per_sm : std::min(per_sm, 2));
  plan->grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, kBM),
                                                                       static_cast<int64_t>(sms) * per_sm)));
  plan->workspace_bytes = plan->acts_in_smem ? 0 : align256(acts) * plan->grid;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_hgt_forward(const HgtStack& st, const HgtRows& in, void* y,
                               const HgtForwardPlan& plan, void* workspace, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  if (!plan.acts_in_smem && workspace == nullptr) return cudaErrorInvalidValue;
  ForwardArgs<T> args{};
  args.st = st;
  args.in = in;
  args.y = static_cast<T*>(y);
  args.scratch = static_cast<T*>(workspace);
  args.scratch_per_cta = static_cast<int64_t>(align256(
      static_cast<size_t>(kBM) * (st.in_dim + 2 * static_cast<size_t>(st.max_width)) * sizeof(T)) / sizeof(T));
  args.acts_in_smem = plan.acts_in_smem;
  DK_CUDA_TRY(cudaFuncSetAttribute(hgt_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(plan.smem_bytes)));
  hgt_forward_kernel<T><<<plan.grid, kThreads, plan.smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t hgt_backward_workspace_bytes(const HgtStack& st, int64_t rows, size_t* bytes) {
  int sms = 0;
  DK_CUDA_TRY(device_sms(&sms));
  *bytes = backward_layout<T>(st, rows, sms).total;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_hgt_backward(const HgtStack& st, const HgtRows& in, const void* grad_y,
                                void* grad_rows, void* const* grad_params, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  if (in.rows == 0) {  // no tokens: every parameter gradient is zero
    int index = 0;
    for (int l = 0; l < st.num_layers; ++l) {
      const HgtLayer& L = st.layers[l];
      const size_t w = L.out_features, per_group = w / L.groups;
      const size_t sizes[4] = {static_cast<size_t>(L.in_features) * per_group, w, per_group, per_group};
      for (int i = 0; i < (L.has_norm ? 4 : 2); ++i)
        DK_CUDA_TRY(cudaMemsetAsync(grad_params[index++], 0, sizes[i] * sizeof(T), stream));
    }
    return cudaSuccess;
  }
  int sms = 0;
  DK_CUDA_TRY(device_sms(&sms));
  const BackwardLayout b = backward_layout<T>(st, in.rows, sms);
  if (workspace == nullptr || workspace_bytes < b.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  const int64_t rows = in.rows;
  const int p = st.in_dim;
  float* grad_x = reinterpret_cast<float*>(ws + b.grad_x);
  float* dh = reinterpret_cast<float*>(ws + b.dh);
  T* dz = reinterpret_cast<T*>(ws + b.dz);
  float* w_part = reinterpret_cast<float*>(ws + b.w_part);
  DK_CUDA_TRY(cudaMemsetAsync(grad_x, 0, static_cast<size_t>(rows) * p * sizeof(float), stream));

  // 1. forward once more, keeping x, z (pre-norm) and h of every layer
  ForwardArgs<T> fwd{};
  fwd.st = st;
  fwd.in = in;
  fwd.save = 1;
  fwd.save_x = reinterpret_cast<T*>(ws + b.save_x);
  for (int l = 0; l < st.num_layers; ++l) {
    fwd.save_z[l] = reinterpret_cast<T*>(ws + b.save_z[l]);
    fwd.save_h[l] = reinterpret_cast<T*>(ws + b.save_h[l]);
  }
  int per_sm = 1;
  DK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hgt_forward_kernel<T>, kThreads,
                                                            sizeof(GemmSmem<T>)));
  const int fwd_grid = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(rows, kBM), static_cast<int64_t>(sms) * std::max(1, per_sm))));
  hgt_forward_kernel<T><<<fwd_grid, kThreads, sizeof(GemmSmem<T>), stream>>>(fwd);
  DK_CUDA_TRY(cudaGetLastError());

  // 2. layers in reverse: dz, bias/norm grads, weight grad, then the input grad
  int first_param[kMaxLayers];
  for (int l = 0, index = 0; l < st.num_layers; ++l) {
    first_param[l] = index;
    index += st.layers[l].has_norm ? 4 : 2;
  }
  for (int l = st.num_layers - 1; l >= 0; --l) {
    const HgtLayer& L = st.layers[l];
    const int w = L.out_features, g = L.groups, K = L.in_features / g, c = w / g;
    const int w_prev = l > 0 ? st.layers[l - 1].out_features : 0;
    const T* z = fwd.save_z[l];
    if (l + 1 == st.num_layers)
      DK_CUDA_TRY((launch_dz<T, T>(st, in, l, z, static_cast<const T*>(grad_y), dz, ws, b, stream)));
    else
      DK_CUDA_TRY((launch_dz<T, float>(st, in, l, z, dh, dz, ws, b, stream)));

    const float* part = reinterpret_cast<const float*>(ws + b.dz_part);
    const int64_t part_stride = b.dz_blocks * st.max_width;
    void* const* grads = grad_params + first_param[l];
    DK_CUDA_TRY(launch_reduce<T>(part, b.dz_blocks, w, w, 1, 0, grads[1], sms, stream));
    if (L.has_norm) {  // affine shared by the groups: fold the g LN groups too
      DK_CUDA_TRY(launch_reduce<T>(part + part_stride, b.dz_blocks, w, c, g, c, grads[2], sms, stream));
      DK_CUDA_TRY(launch_reduce<T>(part + 2 * part_stride, b.dz_blocks, w, c, g, c, grads[3], sms, stream));
    }

    const LayerInput<T> u{fwd.save_x, p, l > 0 ? fwd.save_h[l - 1] : nullptr, w_prev,
                          L.input_kind, p, w_prev, g, K};
    const int splits = static_cast<int>(b.splits[l]);
    WgradArgs<T> wargs{u, dz, w, c, K, splits, rows, b.chunk[l], w_part};
    const dim3 wgrid(static_cast<unsigned>(ceil_div(K, kBM)), static_cast<unsigned>(ceil_div(c, kBN)),
                     static_cast<unsigned>(g * splits));
    hgt_wgrad_kernel<T><<<wgrid, kThreads, 0, stream>>>(wargs);
    DK_CUDA_TRY(cudaGetLastError());
    const int64_t weight_elems = static_cast<int64_t>(g) * K * c;
    DK_CUDA_TRY(launch_reduce<T>(w_part, splits, weight_elems, weight_elems, 1, 0, grads[0], sms, stream));

    DgradArgs<T> dargs{u, dz, static_cast<const T*>(L.weight), w, c, K, rows, grad_x, dh};
    const dim3 dgrid(static_cast<unsigned>(ceil_div(rows, kBM)), static_cast<unsigned>(ceil_div(K, kBN)),
                     static_cast<unsigned>(g));
    hgt_dgrad_kernel<T><<<dgrid, kThreads, 0, stream>>>(dargs);
    DK_CUDA_TRY(cudaGetLastError());
  }
  const int64_t n = rows * p;
  finish_grad_rows_kernel<T><<<elementwise_grid(n, sms), kThreads, 0, stream>>>(
      grad_x, n, st.scale, static_cast<T*>(grad_rows));
  return cudaGetLastError();
}

#define DK_INSTANTIATE(T)                                                                          \
  template cudaError_t plan_hgt_forward<T>(const HgtStack&, int64_t, HgtForwardPlan*);            \
  template cudaError_t launch_hgt_forward<T>(const HgtStack&, const HgtRows&, void*,              \
                                             const HgtForwardPlan&, void*, cudaStream_t);          \
  template cudaError_t hgt_backward_workspace_bytes<T>(const HgtStack&, int64_t, size_t*);        \
  template cudaError_t launch_hgt_backward<T>(const HgtStack&, const HgtRows&, const void*, void*, \
                                              void* const*, void*, size_t, cudaStream_t);
DK_INSTANTIATE(float)
DK_INSTANTIATE(__half)
DK_INSTANTIATE(__nv_bfloat16)
#undef DK_INSTANTIATE

}  // namespace dk_cuda
