// CUDA implementation of gn_reduce; the per-pixel math is in gn.h (shared with gn_cpu.cpp).
//
// Forward: a 1-D grid of E * blocks_per_edge blocks. Each thread walks the pixels of its edge with
// a grid stride, linearises them and accumulates the upper triangle of H and b in double
// registers; the block sums them (warp shuffles, then shared memory) and atomically adds the totals
// into a per-edge double buffer. A second kernel mirrors the triangle and casts to the output
// dtype. Backward: the per-pixel gradients are written directly (each pixel owns its outputs); the
// 12 rel-pose gradients are reduced the same way as H and cast by a last small kernel.
//
// Double atomics make the double sums depend on the order in which blocks finish (rounding in the
// last bits of a double), so unlike the CPU file the result is not bitwise reproducible run to run.
//
// Every launch goes to the legacy default stream (0): ATen/cuda/CUDAContext.h, which gives torch's
// current stream, does not compile with this project's CUDA toolkit (NOTES.md). The kernels
// therefore do not follow a `torch.cuda.stream(...)` context.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_common.cuh"
#include "gn.h"
#include "ops.h"

namespace {

using v2d::block_sum_atomic_add;
using v2d::blocks_for;
using v2d::kPacked;
using v2d::kTriangle;
using v2d::packed_index;

constexpr int kThreads = v2d::kReduceThreads;
constexpr int64_t kPixelsPerThread = 4;  // grid-stride steps per thread: amortises the block reduction

int edge_blocks(int64_t E, int64_t HW) {  // blocks per edge
  const int64_t per_edge = std::max<int64_t>(1, (HW + kThreads * kPixelsPerThread - 1) / (kThreads * kPixelsPerThread));
  TORCH_CHECK(E * per_edge <= std::numeric_limits<int32_t>::max(), "gn_reduce (CUDA): too many edges x pixels (E = ",
              E, ", H*W = ", HW, ") for one launch");
  return static_cast<int>(per_edge);
}

template <typename T>
__device__ void load_to_shared(T* dst, const T* src, int n) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) dst[t] = src[t];
}

// acc: (E, kPacked<K>) double, zeroed before the launch.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    gn_forward_kernel(const scalar_t* __restrict__ inv_depth, const scalar_t* __restrict__ rel_poses,
                      const scalar_t* __restrict__ intrinsics, const scalar_t* __restrict__ targets,
                      const scalar_t* __restrict__ weights, scalar_t min_depth, int64_t HW, int64_t width,
                      int blocks_per_edge, double* __restrict__ acc) {
  const int64_t e = blockIdx.x / blocks_per_edge;
  const int64_t chunk = blockIdx.x % blocks_per_edge;
  __shared__ v2d::GNCamera<scalar_t> cam;
  if (threadIdx.x == 0) v2d::gn_camera(rel_poses + e * 12, intrinsics + e * 4, min_depth, cam);
  __syncthreads();

  double H[K * K] = {};  // gn_accumulate writes the upper triangle only
  double b[K] = {};
  v2d::GNPixel<scalar_t, K> px;
  const int64_t stride = static_cast<int64_t>(blocks_per_edge) * blockDim.x;
  for (int64_t p = chunk * blockDim.x + threadIdx.x; p < HW; p += stride) {
    const int64_t idx = e * HW + p;
    const scalar_t u = static_cast<scalar_t>(p % width), v = static_cast<scalar_t>(p / width);
    const scalar_t* t = targets + 2 * idx;
    const scalar_t* w = weights + 2 * idx;
    if (v2d::gn_linearize<scalar_t, K>(u, v, inv_depth[idx], t[0], t[1], w[0], w[1], cam, px))
      v2d::gn_accumulate<scalar_t, K, double>(px, H, b);
  }

  double packed[kPacked<K>];
#pragma unroll
  for (int i = 0; i < K; ++i) {
#pragma unroll
    for (int j = i; j < K; ++j) packed[packed_index<K>(i, j)] = H[i * K + j];
    packed[kTriangle<K> + i] = b[i];
  }
  block_sum_atomic_add(packed, acc + e * kPacked<K>);
}

// One thread per output entry of H (E, K, K) and b (E, K): mirror the triangle, cast.
template <typename scalar_t, int K>
__global__ void gn_unpack_kernel(const double* __restrict__ acc, int64_t E, scalar_t* __restrict__ H_out,
                                 scalar_t* __restrict__ b_out) {
  constexpr int kPerEdge = K * K + K;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= E * kPerEdge) return;
  const int64_t e = t / kPerEdge;
  const int k = static_cast<int>(t % kPerEdge);
  const double* a = acc + e * kPacked<K>;
  if (k < K * K) {
    const int i = k / K, j = k % K;
    H_out[e * K * K + k] = static_cast<scalar_t>(a[i <= j ? packed_index<K>(i, j) : packed_index<K>(j, i)]);
  } else {
    b_out[e * K + (k - K * K)] = static_cast<scalar_t>(a[kTriangle<K> + (k - K * K)]);
  }
}

// acc: (E, kGNEdgeGrads) double (rel then intrinsics), zeroed before the launch.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    gn_backward_kernel(const scalar_t* __restrict__ grad_H, const scalar_t* __restrict__ grad_b,
                       const scalar_t* __restrict__ inv_depth, const scalar_t* __restrict__ rel_poses,
                       const scalar_t* __restrict__ intrinsics, const scalar_t* __restrict__ targets,
                       const scalar_t* __restrict__ weights, scalar_t min_depth, int64_t HW, int64_t width,
                       int blocks_per_edge, scalar_t* __restrict__ g_d, scalar_t* __restrict__ g_t,
                       scalar_t* __restrict__ g_w, double* __restrict__ acc) {
  const int64_t e = blockIdx.x / blocks_per_edge;
  const int64_t chunk = blockIdx.x % blocks_per_edge;
  __shared__ v2d::GNCamera<scalar_t> cam;
  __shared__ scalar_t Gs[K * K], g[K];
  if (threadIdx.x == 0) v2d::gn_camera(rel_poses + e * 12, intrinsics + e * 4, min_depth, cam);
  load_to_shared(g, grad_b + e * K, K);
  const scalar_t* G = grad_H + e * K * K;
  for (int t = threadIdx.x; t < K * K; t += blockDim.x) Gs[t] = G[t] + G[(t % K) * K + t / K];  // G + G^T
  __syncthreads();

  double g_edge[v2d::kGNEdgeGrads] = {};
  v2d::GNPixel<scalar_t, K> px;
  const int64_t stride = static_cast<int64_t>(blocks_per_edge) * blockDim.x;
  for (int64_t p = chunk * blockDim.x + threadIdx.x; p < HW; p += stride) {
    const int64_t idx = e * HW + p;
    const scalar_t u = static_cast<scalar_t>(p % width), v = static_cast<scalar_t>(p / width);
    const scalar_t* t = targets + 2 * idx;
    const scalar_t* w = weights + 2 * idx;
    if (v2d::gn_linearize<scalar_t, K>(u, v, inv_depth[idx], t[0], t[1], w[0], w[1], cam, px)) {
      v2d::gn_pixel_backward<scalar_t, K, double>(px, cam, Gs, g, g_d[idx], g_t + 2 * idx, g_w + 2 * idx, g_edge);
    } else {
      g_d[idx] = scalar_t(0);
      g_t[2 * idx] = g_t[2 * idx + 1] = scalar_t(0);
      g_w[2 * idx] = g_w[2 * idx + 1] = scalar_t(0);
    }
  }
  block_sum_atomic_add(g_edge, acc + e * v2d::kGNEdgeGrads);
}

// One thread per per-edge gradient: acc (E, kGNEdgeGrads) -> g_rel (E, 12) and g_intr (E, 4), cast.
template <typename scalar_t>
__global__ void split_edge_grads_kernel(const double* __restrict__ acc, int64_t E, scalar_t* __restrict__ g_rel,
                                        scalar_t* __restrict__ g_intr) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= E * v2d::kGNEdgeGrads) return;
  const int64_t e = t / v2d::kGNEdgeGrads;
  const int k = static_cast<int>(t % v2d::kGNEdgeGrads);
  if (k < 12)
    g_rel[e * 12 + k] = static_cast<scalar_t>(acc[t]);
  else
    g_intr[e * 4 + (k - 12)] = static_cast<scalar_t>(acc[t]);
}

template <typename scalar_t, int K>
void forward_impl(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses, const torch::Tensor& intrinsics,
                  const torch::Tensor& targets, const torch::Tensor& weights, double min_depth, torch::Tensor& H_out,
                  torch::Tensor& b_out) {
  const int64_t E = inv_depth.size(0), HW = inv_depth.size(1) * inv_depth.size(2), width = inv_depth.size(2);
  const int per_edge = edge_blocks(E, HW);
  const torch::Tensor acc = v2d::zeroed_double_buffer(inv_depth, {E, kPacked<K>}, "gn_reduce");
  gn_forward_kernel<scalar_t, K><<<static_cast<unsigned>(E * per_edge), kThreads, 0, 0>>>(
      inv_depth.data_ptr<scalar_t>(), rel_poses.data_ptr<scalar_t>(), intrinsics.data_ptr<scalar_t>(),
      targets.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), static_cast<scalar_t>(min_depth), HW, width,
      per_edge, acc.data_ptr<double>());
  v2d::check_launch("gn_reduce_forward_cuda (accumulate)");
  gn_unpack_kernel<scalar_t, K><<<static_cast<unsigned>(blocks_for(E * (K * K + K))), kThreads, 0, 0>>>(
      acc.data_ptr<double>(), E, H_out.data_ptr<scalar_t>(), b_out.data_ptr<scalar_t>());
  v2d::check_launch("gn_reduce_forward_cuda (unpack)");
}

template <typename scalar_t, int K>
void backward_impl(const torch::Tensor& grad_H, const torch::Tensor& grad_b, const torch::Tensor& inv_depth,
                   const torch::Tensor& rel_poses, const torch::Tensor& intrinsics, const torch::Tensor& targets,
                   const torch::Tensor& weights, double min_depth, torch::Tensor& g_d, torch::Tensor& g_rel,
                   torch::Tensor& g_intr, torch::Tensor& g_t, torch::Tensor& g_w) {
  const int64_t E = inv_depth.size(0), HW = inv_depth.size(1) * inv_depth.size(2), width = inv_depth.size(2);
  const int per_edge = edge_blocks(E, HW);
  const torch::Tensor acc = v2d::zeroed_double_buffer(inv_depth, {E, v2d::kGNEdgeGrads}, "gn_reduce");
  gn_backward_kernel<scalar_t, K><<<static_cast<unsigned>(E * per_edge), kThreads, 0, 0>>>(
      grad_H.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>(), inv_depth.data_ptr<scalar_t>(),
      rel_poses.data_ptr<scalar_t>(), intrinsics.data_ptr<scalar_t>(), targets.data_ptr<scalar_t>(),
      weights.data_ptr<scalar_t>(), static_cast<scalar_t>(min_depth), HW, width, per_edge,
      g_d.data_ptr<scalar_t>(), g_t.data_ptr<scalar_t>(), g_w.data_ptr<scalar_t>(), acc.data_ptr<double>());
  v2d::check_launch("gn_reduce_backward_cuda (pixels)");
  split_edge_grads_kernel<scalar_t><<<static_cast<unsigned>(blocks_for(E * v2d::kGNEdgeGrads)), kThreads, 0, 0>>>(
      acc.data_ptr<double>(), E, g_rel.data_ptr<scalar_t>(), g_intr.data_ptr<scalar_t>());
  v2d::check_launch("gn_reduce_backward_cuda (edge gradients)");
}

}  // namespace

std::vector<torch::Tensor> gn_reduce_forward_cuda(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                  const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                  const torch::Tensor& weights, double min_depth, bool with_focal) {
  v2d::check_on_cuda("gn_reduce_forward_cuda", inv_depth);  // bindings.cpp checked the rest (checks.h)
  const c10::DeviceGuard device_guard(inv_depth.device());  // launches go to the inputs' GPU
  const int64_t E = inv_depth.size(0);
  const int64_t K = with_focal ? 7 : 6;
  auto H = torch::empty({E, K, K}, inv_depth.options());
  auto b = torch::empty({E, K}, inv_depth.options());
  if (E == 0) return {H, b};
  AT_DISPATCH_FLOATING_TYPES(inv_depth.scalar_type(), "gn_reduce_forward_cuda", [&] {
    if (with_focal)
      forward_impl<scalar_t, 7>(inv_depth, rel_poses, intrinsics, targets, weights, min_depth, H, b);
    else
      forward_impl<scalar_t, 6>(inv_depth, rel_poses, intrinsics, targets, weights, min_depth, H, b);
  });
  return {H, b};
}

std::vector<torch::Tensor> gn_reduce_backward_cuda(const torch::Tensor& grad_H, const torch::Tensor& grad_b,
                                                   const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                   const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                   const torch::Tensor& weights, double min_depth, bool with_focal) {
  v2d::check_on_cuda("gn_reduce_backward_cuda", inv_depth);  // bindings.cpp checked the rest (checks.h)
  const int64_t E = inv_depth.size(0);
  const c10::DeviceGuard device_guard(inv_depth.device());
  auto g_d = torch::empty_like(inv_depth);
  auto g_rel = torch::empty_like(rel_poses);
  auto g_intr = torch::empty_like(intrinsics);
  auto g_t = torch::empty_like(targets);
  auto g_w = torch::empty_like(weights);
  if (E == 0) return {g_d, g_rel, g_intr, g_t, g_w};
  AT_DISPATCH_FLOATING_TYPES(inv_depth.scalar_type(), "gn_reduce_backward_cuda", [&] {
    if (with_focal)
      backward_impl<scalar_t, 7>(grad_H, grad_b, inv_depth, rel_poses, intrinsics, targets, weights, min_depth, g_d,
                                 g_rel, g_intr, g_t, g_w);
    else
      backward_impl<scalar_t, 6>(grad_H, grad_b, inv_depth, rel_poses, intrinsics, targets, weights, min_depth, g_d,
                                 g_rel, g_intr, g_t, g_w);
  });
  return {g_d, g_rel, g_intr, g_t, g_w};
}
