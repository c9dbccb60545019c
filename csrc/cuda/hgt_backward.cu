// Backward of the fused HGT op: recompute (the forward in save mode), then per layer the
// LN/act/dropout backward, the dX and dW grouped GEMMs and fixed-order reductions. Deterministic:
// no atomics. Device building blocks: hgt_device.cuh. Design: bench/gpu_cuda_notes.md.
#include "hgt_device.cuh"

namespace dk_cuda {
namespace {

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
    const int uq = define_kernels::hgt_unshuffled_index(q, g, c, st.shuffle);
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
  __device__ __forceinline__ const T* vector_source(int k, int n) const {  // 16-byte staging
    if (k >= len || n + kVector<T> > cols) return nullptr;
    const T* src = dz + (t0 + k) * w + col0 + n;
    return aligned16(src) ? src : nullptr;
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
  __device__ __forceinline__ const T* vector_source(int m, int k) const {  // 16-byte staging
    if (m >= nrows || k + kVector<T> > c) return nullptr;
    const T* src = dz + (row0 + m) * w + col0 + k;
    return aligned16(src) ? src : nullptr;
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


// ------------------------------------------------------------------------ host side
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
  detail::ForwardArgs<T> fwd{};
  fwd.st = st;
  fwd.in = in;
  fwd.save = 1;
  fwd.save_x = reinterpret_cast<T*>(ws + b.save_x);
  for (int l = 0; l < st.num_layers; ++l) {
    fwd.save_z[l] = reinterpret_cast<T*>(ws + b.save_z[l]);
    fwd.save_h[l] = reinterpret_cast<T*>(ws + b.save_h[l]);
  }
  DK_CUDA_TRY(detail::launch_forward_save<T>(fwd, sms, stream));

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
  template cudaError_t hgt_backward_workspace_bytes<T>(const HgtStack&, int64_t, size_t*);        \
  template cudaError_t launch_hgt_backward<T>(const HgtStack&, const HgtRows&, const void*, void*, \
                                              void* const*, void*, size_t, cudaStream_t);
DK_INSTANTIATE(float)
DK_INSTANTIATE(__half)
DK_INSTANTIATE(__nv_bfloat16)
#undef DK_INSTANTIATE

}  // namespace dk_cuda
