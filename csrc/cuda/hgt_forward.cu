// The one-launch forward of the fused HGT op (also the activation-saving forward of the backward).
// Device building blocks: hgt_device.cuh. Design: bench/gpu_cuda_notes.md.
#include "hgt_device.cuh"

namespace dk_cuda {
namespace detail {
namespace {

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
__global__ void __launch_bounds__(kThreads, ForwardMinBlocks<T>::value) hgt_forward_kernel(const __grid_constant__ ForwardArgs<T> a) {
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
      const T v = table[define_kernels::hgt_element_offset(table_row(a.in, row0 + r), a.in.x_stride0,
                                                           col, a.in.x_stride1)];
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
            const int q = define_kernels::hgt_output_position(j, col, g, c, st.shuffle);
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


}  // namespace

template <typename T>
cudaError_t launch_forward_save(const ForwardArgs<T>& args, int sms, cudaStream_t stream) {
  int per_sm = 1;
  DK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hgt_forward_kernel<T>, kThreads,
                                                            sizeof(GemmSmem<T>)));
  const int grid = static_cast<int>(define_kernels::hgt_forward_grid(args.in.rows, kBM, sms, per_sm, 0, 0, 0));
  hgt_forward_kernel<T><<<grid, kThreads, sizeof(GemmSmem<T>), stream>>>(args);
  return cudaGetLastError();
}

}  // namespace detail

using detail::ForwardArgs;
using detail::hgt_forward_kernel;

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
  // Global-scratch mode: the grid is capped so that all CTAs' slices fit kL2BudgetFraction of the
  // L2; the persistent CTAs then walk the tiles in waves whose scratch stays L2-resident.
  int l2_bytes = 0;
  DK_CUDA_TRY(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  plan->grid = static_cast<int>(define_kernels::hgt_forward_grid(
      rows, kBM, sms, per_sm, !plan->acts_in_smem, static_cast<int64_t>(align256(acts)),
      static_cast<int64_t>(l2_bytes * kL2BudgetFraction)));
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

#define DK_INSTANTIATE(T)                                                                          \
  template cudaError_t plan_hgt_forward<T>(const HgtStack&, int64_t, HgtForwardPlan*);            \
  template cudaError_t launch_hgt_forward<T>(const HgtStack&, const HgtRows&, void*,              \
                                             const HgtForwardPlan&, void*, cudaStream_t);          \
  template cudaError_t detail::launch_forward_save<T>(const detail::ForwardArgs<T>&, int, cudaStream_t);
DK_INSTANTIATE(float)
DK_INSTANTIATE(__half)
DK_INSTANTIATE(__nv_bfloat16)
#undef DK_INSTANTIATE

}  // namespace dk_cuda
