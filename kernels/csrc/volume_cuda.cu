// CUDA implementation of backproject_volume; the per-sample math is in volume.h (shared with
// volume_cpu.cpp, whose tests therefore cover the arithmetic run here).
//
// Grid: blockIdx.y = neighbour m, and one thread per (depth, keyframe pixel) of that neighbour, so
// a block never spans two neighbours. Each thread projects its sample once and loops over the
// channels; consecutive threads are consecutive pixels, so the volume (and its gradient) is read
// and written coalesced, one channel plane at a time.
// Backward: feature gradients are scattered with atomicAdd (taps of neighbouring samples overlap).
// Each thread's 12 pose-gradient terms (double) are summed over the block (warp shuffles, then
// shared memory) into one partial per block; a second kernel adds the partials of each neighbour in
// block order and casts, so the pose gradient is reproducible run to run (the feature gradient is
// not bitwise: float atomics add in arrival order).
//
// Every launch, and the memset, goes to the legacy default stream (0): ATen/cuda/CUDAContext.h,
// which gives torch's current stream, does not compile with this project's CUDA toolkit
// (NOTES.md); as in gn_cuda.cu, the kernels do not follow a `torch.cuda.stream(...)` context.
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda_common.cuh"
#include "ops.h"
#include "volume.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

// Launch limits of this file's grids; bindings.cpp checked devices, dtypes and shapes (checks.h).
void check_cuda_limits(const char* op, const torch::Tensor& features) {
  v2d::check_on_cuda(op, features);
  const int64_t M = features.size(0);
  TORCH_CHECK(M <= 65535, op, ": at most 65535 neighbours (one grid row each), got ", M);
  TORCH_CHECK(features.size(2) * features.size(3) <= INT32_MAX, op, ": feature maps larger than 2^31 pixels");
}

// Per-sample set-up shared by both kernels: sample index -> (depth, pixel), projection and taps.
template <typename T>
__device__ bool setup_sample(int64_t i, int64_t hw, int w, int h, const T* rel, const T* intr, const T* z,
                             int64_t& d, int64_t& p, v2d::VolumeSample<T>& s, v2d::VolumeTaps<T>& t) {
  d = i / hw;
  p = i % hw;
  return v2d::volume_project<T>(T(p % w), T(p / w), z[d], rel, intr, s) && v2d::volume_taps<T>(s, h, w, t);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ f, const T* __restrict__ rel, const T* __restrict__ intr,
                               const T* __restrict__ z, T* __restrict__ out, int64_t C, int64_t D, int h, int w) {
  const int64_t m = blockIdx.y, hw = int64_t(h) * w;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= D * hw) return;
  int64_t d, p;
  v2d::VolumeSample<T> s;
  v2d::VolumeTaps<T> t;
  const bool ok = setup_sample<T>(i, hw, w, h, rel + 12 * m, intr + 4 * m, z, d, p, s, t);
  const T* fm = f + m * C * hw;
  T* o = out + m * C * D * hw + d * hw + p;  // channel c at o[c * D * hw]
  for (int64_t c = 0; c < C; ++c) {
    T v[4] = {T(0), T(0), T(0), T(0)};
    if (ok && t.all_in)
      v2d::volume_gather<true>(fm + c * hw, t, v);
    else if (ok)
      v2d::volume_gather<false>(fm + c * hw, t, v);
    o[c * D * hw] = ok ? v2d::volume_interp(t, v) : T(0);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ g, const T* __restrict__ f, const T* __restrict__ rel,
                                const T* __restrict__ intr, const T* __restrict__ z, T* __restrict__ gf,
                                double* __restrict__ partial, int64_t C, int64_t D, int h, int w) {
  __shared__ double warp_sums[12][kWarps];
  const int64_t m = blockIdx.y, hw = int64_t(h) * w;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc[12] = {0};
  // No early return: every thread of the block takes part in the reduction below.
  if (i < D * hw) {
    int64_t d, p;
    v2d::VolumeSample<T> s;
    v2d::VolumeTaps<T> t;
    if (setup_sample<T>(i, hw, w, h, rel + 12 * m, intr + 4 * m, z, d, p, s, t)) {
      const T* fm = f + m * C * hw;
      T* gfm = gf + m * C * hw;
      const T* gm = g + m * C * D * hw + d * hw + p;
      double gu = 0, gv = 0;
      for (int64_t c = 0; c < C; ++c) {
        const T go = gm[c * D * hw];
        T v[4], du, dv;
        if (t.all_in)
          v2d::volume_gather<true>(fm + c * hw, t, v);
        else
          v2d::volume_gather<false>(fm + c * hw, t, v);
        v2d::volume_interp_grad_uv(t, v, du, dv);
        gu += double(go) * double(du);
        gv += double(go) * double(dv);
        for (int k = 0; k < 4; ++k)
          if (t.in[k]) atomicAdd(gfm + c * hw + t.off[k], t.wt[k] * go);
      }
      v2d::volume_pose_grad<T, double>(s, intr + 4 * m, gu, gv, acc);
    }
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int q = 0; q < 12; ++q) {
    double v = acc[q];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[q][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < 12) {
    double total = 0;
    for (int k = 0; k < kWarps; ++k) total += warp_sums[threadIdx.x][k];
    partial[(m * gridDim.x + blockIdx.x) * 12 + threadIdx.x] = total;
  }
}

// g_rel[m, q] = sum over the blocks b of neighbour m of partial[m, b, q], in block order.
template <typename T>
__global__ void pose_sum_kernel(const double* __restrict__ partial, int64_t M, int64_t blocks, T* __restrict__ g_rel) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M * 12) return;
  const int64_t m = j / 12, q = j % 12;
  double total = 0;
  for (int64_t b = 0; b < blocks; ++b) total += partial[(m * blocks + b) * 12 + q];
  g_rel[j] = static_cast<T>(total);
}

}  // namespace

torch::Tensor backproject_volume_forward_cuda(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                              const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  check_cuda_limits("backproject_volume_forward_cuda", features);
  const c10::DeviceGuard device_guard(features.device());  // launches go to the inputs' GPU
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t D = depths.size(0);
  // Every element is written by the kernel (zeros included), so no memset.
  auto out = torch::empty({M, C, D, h, w}, features.options());
  const int64_t n = D * h * w;
  if (out.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(M));
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_forward_cuda", [&] {
    forward_kernel<scalar_t><<<grid, kThreads, 0, 0>>>(
        features.data_ptr<scalar_t>(), rel_poses.data_ptr<scalar_t>(), intrinsics.data_ptr<scalar_t>(),
        depths.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, D, static_cast<int>(h), static_cast<int>(w));
  });
  v2d::check_launch("backproject_volume_forward_cuda");
  return out;
}

std::vector<torch::Tensor> backproject_volume_backward_cuda(const torch::Tensor& grad_volume,
                                                            const torch::Tensor& features,
                                                            const torch::Tensor& rel_poses,
                                                            const torch::Tensor& intrinsics,
                                                            const torch::Tensor& depths) {
  check_cuda_limits("backproject_volume_backward_cuda", features);
  const c10::DeviceGuard device_guard(features.device());
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t D = depths.size(0);
  auto g_feat = torch::empty_like(features);
  auto g_rel = torch::empty_like(rel_poses);
  // cudaMemsetAsync, not torch::zeros: keeps every step of the op on the same (default) stream.
  if (g_feat.numel() > 0) {
    const cudaError_t err = cudaMemsetAsync(g_feat.data_ptr(), 0, g_feat.nbytes(), 0);
    TORCH_CHECK(err == cudaSuccess, "backproject_volume_backward_cuda: cudaMemsetAsync failed: ",
                cudaGetErrorString(err));
  }
  const int64_t n = D * h * w;
  const int64_t blocks = n > 0 ? (n + kThreads - 1) / kThreads : 0;
  if (M == 0) return {g_feat, g_rel};
  auto partial = torch::empty({M, blocks, 12}, features.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_backward_cuda", [&] {
    if (blocks > 0) {
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(M));
      backward_kernel<scalar_t><<<grid, kThreads, 0, 0>>>(
          grad_volume.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), rel_poses.data_ptr<scalar_t>(),
          intrinsics.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(), g_feat.data_ptr<scalar_t>(),
          partial.data_ptr<double>(), C, D, static_cast<int>(h), static_cast<int>(w));
      v2d::check_launch("backproject_volume_backward_cuda (samples)");
    }
    pose_sum_kernel<scalar_t><<<static_cast<unsigned>((M * 12 + kThreads - 1) / kThreads), kThreads, 0, 0>>>(
        partial.data_ptr<double>(), M, blocks, g_rel.data_ptr<scalar_t>());
    v2d::check_launch("backproject_volume_backward_cuda (pose sum)");
  });
  return {g_feat, g_rel};
}
