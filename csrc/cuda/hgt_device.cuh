// Device building blocks shared by the forward (hgt_forward.cu) and backward (hgt_backward.cu)
// kernels of the fused HGT op:
//   1. scalar helpers: dtype conversion, the dropout hash, activations, LN moments
//   2. cta_gemm: one CTA computes a 64 x 64 fp32 tile of A @ B from element loaders, operand
//      tiles staged in 16-byte chunks (cp.async on sm_80+) where the loader says a chunk is
//      contiguous and aligned (tensor cores via ldmatrix + mma.sync for fp16/bf16, fp32 FMA)
//   3. layer input addressing: mix / concat / shuffle folded into index math (the pure part of it
//      lives in define_kernels/hgt_index_math.h, tested on the CPU), never materialized
//   4. ForwardArgs and the internal launcher the backward uses for its activation-saving forward
//   5. host helpers
// Internal to csrc/cuda (the public launchers are in hgt_kernels.cuh). Math contract:
// define_kernels/reference.py. Design: bench/gpu_cuda_notes.md.
#pragma once

#include "hgt_kernels.cuh"

#include <define_kernels/dropout_hash.h>
#include <define_kernels/hgt_index_math.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>
#include <utility>

namespace dk_cuda {
namespace {

constexpr int kThreads = 256;                 // 8 warps per CTA in every kernel
constexpr int kBM = 64, kBN = 64, kBK = 32;   // cta_gemm tile; kBM is also the forward token tile
constexpr int kPadAB = 8;                     // keeps WMMA rows 32-byte aligned, spreads banks
constexpr int kPadC = 4;
constexpr float kLnEps = 1e-5f;
// Forward occupancy target (CTAs per SM the register allocation must allow): 3, i.e. at most 80
// registers. sm_90 / sm_80, no spill: fp32 80, fp16/bf16 76-78 since the operand tiles are
// staged in 16-byte chunks (cp.async); with element-wise staging the 16-bit path needed 120 (2
// CTAs/SM) and spilled 8 bytes at 80.
template <typename T> struct ForwardMinBlocks { static constexpr int value = 3; };
// Share of the device's L2 the forward's global activation scratch may occupy (the rest holds
// the weights, the gathered map rows and y on their way out).
constexpr double kL2BudgetFraction = 0.75;

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

// 16-byte operand staging. A loader whose operand is row-contiguous may define
// `const T* vector_source(row, col)`: the address of elements (row, col .. col + 16 / sizeof(T) - 1)
// when they are in bounds, consecutive in one source and 16-byte aligned, else nullptr.
template <typename L, typename = void> struct HasVectorSource : std::false_type {};
template <typename L>
struct HasVectorSource<L, std::void_t<decltype(std::declval<const L&>().vector_source(0, 0))>>
    : std::true_type {};

template <typename T> constexpr int kVector = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ bool aligned16(const void* p) {
  return define_kernels::hgt_is_aligned(reinterpret_cast<uintptr_t>(p), 16);
}

// Global -> shared without a register round trip (sm_80+ cp.async, L2 only: the operands are
// re-read from L2 by the next tile, not from L1); a plain 16-byte copy where the source is shared
// memory (the forward's activation tiles in smem mode) or the target predates sm_80.
__device__ __forceinline__ void copy16_to_shared(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (__isGlobal(src)) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"(static_cast<unsigned>(__cvta_generic_to_shared(dst))), "l"(src) : "memory");
    return;
  }
#endif
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

// Waits for this thread's cp.async copies; the caller's __syncthreads then publishes them.
__device__ __forceinline__ void wait_copies_to_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// stage_tile in 16-byte chunks (consecutive threads take consecutive chunks of a row): each chunk
// through vector_source when it has one, else element by element through `load` (zero fill,
// odd widths, straddling groups, misaligned strides). dst rows (ld) are 16-byte multiples.
template <int R, int C, typename T, typename Load>
__device__ __forceinline__ void stage_tile_vector(T* dst, int ld, const Load& load, int row_off, int col_off) {
  constexpr int V = kVector<T>;
  static_assert(C % V == 0, "tile width must be a whole number of 16-byte chunks");
  for (int idx = threadIdx.x; idx < R * (C / V); idx += kThreads) {
    const int r = idx / (C / V), c = (idx % (C / V)) * V;
    T* d = dst + r * ld + c;
    const T* src = load.vector_source(r + row_off, c + col_off);
    if (src != nullptr) {
      copy16_to_shared(d, src);
    } else {  // (not unrolled: the rare path must not cost the common one registers)
#pragma unroll 1
      for (int v = 0; v < V; ++v) d[v] = load(r + row_off, c + col_off + v);
    }
  }
}

// One operand tile into shared memory: vectorized where the loader allows it.
template <int R, int C, typename T, typename Load>
__device__ __forceinline__ void stage_operand(T* dst, int ld, const Load& load, int row_off, int col_off) {
  if constexpr (HasVectorSource<Load>::value && !Load::kRowFastest)
    stage_tile_vector<R, C>(dst, ld, load, row_off, col_off);
  else
    stage_tile<R, C, Load::kRowFastest>(dst, ld, load, row_off, col_off);
}


#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Four 8 x 8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8. Rows must be 16-byte aligned (the GemmSmem strides, 80 and 144 bytes, are).
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}
// Two 8 x 8 b16 matrices, each transposed (lanes 0-15 give the row addresses): B stored [k][n]
// row-major (rows k, k + 8 of one 8-column block) becomes the {b0, b1} fragment of m16n8k16.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
}
// d += a (16 x 16, row) @ b (16 x 8, col), fp32 accumulate.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1, __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1, __half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Both operand tiles of one K step, visible to the whole CTA on return.
template <typename T, typename LoadA, typename LoadB>
__device__ __forceinline__ void stage_operands(T* a, T* b, const LoadA& load_a, const LoadB& load_b, int k0) {
  // fp32 (FMA path): A element by element; staging it in chunks too spilled 8 bytes on sm_80
  // at the forward's 80-register bound, and the FMA loop, not the loads, bounds fp32.
  if constexpr (UseTensorCores<T>::value) stage_operand<kBM, kBK>(a, kBK + kPadAB, load_a, 0, k0);
  else stage_tile<kBM, kBK, LoadA::kRowFastest>(a, kBK + kPadAB, load_a, 0, k0);
  stage_operand<kBK, kBN>(b, kBN + kPadAB, load_b, k0, 0);  // GemmSmem::b rows
  wait_copies_to_shared();
  __syncthreads();
}

// s.c = A[0:64, 0:K] @ B[0:K, 0:64] in fp32. load_a(m, k) and load_b(k, n) return T and handle
// every mask and every layout (mix, concat, transposes), so one GEMM body serves all five uses.
// Ends with a barrier: s.c is ready for all threads.
template <typename T, typename LoadA, typename LoadB>
__device__ void cta_gemm(GemmSmem<T>& s, int K, const LoadA& load_a, const LoadB& load_b) {
  if constexpr (UseTensorCores<T>::value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // mma.sync m16n8k16 with operands through ldmatrix (WMMA's bf16 loads compile to generic
    // LD.E, its f16 loads to shared ones; ldmatrix is the shared-memory fragment load for both).
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % 4, wn = warp / 4;  // 4 x 2 warps, each a 16 x 32 strip = 4 n-blocks of 8
    float acc[4][4] = {};
    // This lane's ldmatrix row addresses (shared-space bytes) at k = 0, computed once.
    const unsigned a_rows = shared_address(&s.a[wm * 16 + lane % 16][(lane / 16) * 8]);
    const unsigned b_rows = shared_address(&s.b[lane % 16][wn * 32]);
    for (int k0 = 0; k0 < K; k0 += kBK) {
      stage_operands(&s.a[0][0], &s.b[0][0], load_a, load_b, k0);
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t a[4];
        ldmatrix_x4(a, a_rows + kk * sizeof(T));
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {  // one 16 x 8 B fragment at a time: fits 80 registers
          uint32_t b[2];
          ldmatrix_x2_trans(b, b_rows + (kk * (kBN + kPadAB) + nb * 8) * sizeof(T));
          mma_m16n8k16(acc[nb], a, b[0], b[1], T{});
        }
      }
      __syncthreads();
    }
    const int g = lane / 4, t = lane % 4;  // accumulator layout of m16n8: rows g, g + 8; cols 2t, 2t + 1
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
      float* top = &s.c[wm * 16 + g][wn * 32 + nb * 8 + 2 * t];
      float* bottom = &s.c[wm * 16 + g + 8][wn * 32 + nb * 8 + 2 * t];
      top[0] = acc[nb][0];
      top[1] = acc[nb][1];
      bottom[0] = acc[nb][2];
      bottom[1] = acc[nb][3];
    }
#else
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp % 4, wn = warp / 4;  // 4 x 2 warps, each a 16 x 32 strip
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int k0 = 0; k0 < K; k0 += kBK) {
      stage_operands(&s.a[0][0], &s.b[0][0], load_a, load_b, k0);
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
#endif
  } else {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 4 x 4 outputs per thread
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kBK) {
      stage_operands(&s.a[0][0], &s.b[0][0], load_a, load_b, k0);
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
    return define_kernels::hgt_input_column(kind, p, w_prev, groups, group_in, j, k, col);
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
  __device__ __forceinline__ const T* vector_source(int m, int k) const {
    if (m >= rows || k + kVector<T> > K) return nullptr;
    int col;
    const int span = define_kernels::hgt_input_span(in.kind, in.p, in.w_prev, in.groups, in.group_in, j, k,
                                                    kVector<T>, &col);
    if (span == define_kernels::kHgtSpanSplit) return nullptr;
    const T* src = span == define_kernels::kHgtSpanX ? in.x + m * in.ldx + col : in.h + m * in.ldh + col;
    return aligned16(src) ? src : nullptr;
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
  __device__ __forceinline__ const T* vector_source(int k, int n) const {
    const int col = n0 + n;
    if (k >= K || col + kVector<T> > c) return nullptr;
    const T* src = w + static_cast<int64_t>(k) * c + col;
    return aligned16(src) ? src : nullptr;
  }
};


// ------------------------------------------------------------------------ 5. host helpers
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

}  // namespace

namespace detail {

// ------------------------------------------------------------------------ 4. forward arguments
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

// The forward kernel in save mode (a.save = 1: x, z and h of every layer to global memory), on a
// grid that fills the GPU; used by launch_hgt_backward.
template <typename T>
cudaError_t launch_forward_save(const ForwardArgs<T>& args, int sms, cudaStream_t stream);

}  // namespace detail
}  // namespace dk_cuda
