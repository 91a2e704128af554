// CUDA implementation of ba_reduce; the per-pixel math is in ba.h (shared with ba_cpu.cpp, whose
// tests therefore cover the arithmetic run here).
//
// Edges are grouped by source keyframe on the host (CSR from ii: offsets, then the edge ids of each
// keyframe in edge order) and uploaded. One kernel runs a 1-D grid of Kf * blocks_per_kf blocks, so
// a block holds pixels of one keyframe only; each thread owns kPixelsPerThread pixels of it (strided
// by the block size, so accesses are coalesced) and loops over the keyframe's edges in edge order:
//  - per pixel and edge it linearises (ba_linearize) and writes the coupling c directly;
//  - c_own, h_pp and g_p are summed over the edges in registers (in edge order, as on the CPU) and
//    written once at the end: each pixel owns its outputs, no atomics, and keyframes without edges
//    write zeros;
//  - per edge, H_jj (upper triangle) and g_j are summed over the thread's pixels in double
//    registers, then over the block (warp shuffles, then shared memory) and atomically added into a
//    per-edge double buffer. A second kernel mirrors the triangle and casts to the output dtype.
// Each pixel is linearised once per edge, and there is one block reduction per (edge, block), as in
// gn_cuda.cu.
//
// Double atomics make H_jj and g_j depend on the order in which blocks finish (rounding in the last
// bits of a double), so unlike the CPU file they are not bitwise reproducible run to run; c, c_own,
// h_pp and g_p are.
//
// Every launch, the memset and the upload of the edge lists go to the legacy default stream (0):
// ATen/cuda/CUDAContext.h, which gives torch's current stream, does not compile with this project's
// CUDA toolkit (NOTES.md); as in gn_cuda.cu, the kernels do not follow a `torch.cuda.stream(...)`
// context. Building the edge lists copies ii to the host (one synchronisation per call).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ba.h"
#include "cuda_common.cuh"
#include "ops.h"

namespace {

using v2d::block_sum_atomic_add;
using v2d::blocks_for;
using v2d::packed_index;

constexpr int kThreads = v2d::kReduceThreads;
constexpr int kPixelsPerThread = 4;  // pixels a thread owns: amortises the per-edge block reduction
constexpr int kPixelsPerBlock = kThreads * kPixelsPerThread;

// Per-edge values that are reduced: the upper triangle of H_jj (i <= j, packed row by row), then g_j.
constexpr int kTriangle = v2d::kTriangle<6>;
constexpr int kPacked = v2d::kPacked<6>;

// Block b covers pixels [chunk * kPixelsPerBlock, ...) of keyframe b / blocks_per_kf.
// csr: offsets (Kf + 1) then edge ids (E), edges of keyframe k at csr[Kf + 1 + offsets[k] ...].
// acc: (E, kPacked) double, zeroed before the launch. c: (E, P, 6); c_own: (Kf, P, 6); h_pp, g_p: (Kf, P).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ba_kernel(const scalar_t* __restrict__ inv_depth, const int64_t* __restrict__ csr, int64_t Kf,
              const scalar_t* __restrict__ rel_poses, const scalar_t* __restrict__ adjoints,
              const scalar_t* __restrict__ intrinsics, const scalar_t* __restrict__ targets,
              const scalar_t* __restrict__ weights, int64_t P, int64_t width, scalar_t stride, scalar_t min_depth,
              scalar_t inv_c2, int blocks_per_kf, double* __restrict__ acc, scalar_t* __restrict__ c_out,
              scalar_t* __restrict__ own_out, scalar_t* __restrict__ hpp_out, scalar_t* __restrict__ gp_out) {
  const int64_t k = blockIdx.x / blocks_per_kf;
  const int64_t chunk = blockIdx.x % blocks_per_kf;
  const int64_t first = csr[k], last = csr[k + 1];  // the same for the whole block
  const int64_t* edges = csr + Kf + 1;
  __shared__ v2d::GNCamera<scalar_t> cam;
  __shared__ scalar_t adj[36];

  // The thread's pixels: position and inverse depth, loaded once for all edges.
  int64_t pix[kPixelsPerThread];
  scalar_t u[kPixelsPerThread], v[kPixelsPerThread], rho[kPixelsPerThread];
  scalar_t own[kPixelsPerThread][6], hpp[kPixelsPerThread], gp[kPixelsPerThread];
#pragma unroll
  for (int q = 0; q < kPixelsPerThread; ++q) {
    pix[q] = chunk * kPixelsPerBlock + q * kThreads + threadIdx.x;
    const int64_t p = pix[q] < P ? pix[q] : 0;  // pixels past P read pixel 0 here and are skipped below
    u[q] = static_cast<scalar_t>(p % width) * stride;
    v[q] = static_cast<scalar_t>(p / width) * stride;
    rho[q] = inv_depth[k * P + p];
#pragma unroll
    for (int i = 0; i < 6; ++i) own[q][i] = scalar_t(0);
    hpp[q] = gp[q] = scalar_t(0);
  }

  v2d::BAPixel<scalar_t> px;
  for (int64_t l = first; l < last; ++l) {
    const int64_t e = edges[l];
    __syncthreads();  // the previous edge's readers of cam, adj and the reduction's shared memory are done
    if (threadIdx.x == 0) v2d::gn_camera(rel_poses + e * 12, intrinsics, min_depth, cam);
    for (int t = threadIdx.x; t < 36; t += blockDim.x) adj[t] = adjoints[e * 36 + t];
    __syncthreads();

    double H[36] = {};  // gn_accumulate writes the upper triangle only
    double g[6] = {};
#pragma unroll
    for (int q = 0; q < kPixelsPerThread; ++q) {
      if (pix[q] >= P) continue;
      const int64_t idx = e * P + pix[q];
      const bool valid = v2d::ba_linearize<scalar_t>(u[q], v[q], rho[q], targets[2 * idx], targets[2 * idx + 1],
                                                     weights[idx], inv_c2, cam, px);
      if (valid) v2d::gn_accumulate<scalar_t, 6, double>(px.gn, H, g);
#pragma unroll
      for (int i = 0; i < 6; ++i) c_out[idx * 6 + i] = px.c[i];
      v2d::ba_add_own(px.c, adj, own[q]);
      hpp[q] += px.hpp;
      gp[q] += px.gp;
    }

    double packed[kPacked];
#pragma unroll
    for (int i = 0; i < 6; ++i) {
#pragma unroll
      for (int j = i; j < 6; ++j) packed[packed_index<6>(i, j)] = H[i * 6 + j];
      packed[kTriangle + i] = g[i];
    }
    block_sum_atomic_add(packed, acc + e * kPacked);
  }

#pragma unroll
  for (int q = 0; q < kPixelsPerThread; ++q) {
    if (pix[q] >= P) continue;
    const int64_t idx = k * P + pix[q];
#pragma unroll
    for (int i = 0; i < 6; ++i) own_out[idx * 6 + i] = own[q][i];
    hpp_out[idx] = hpp[q];
    gp_out[idx] = gp[q];
  }
}

// One thread per output entry of H_jj (E, 6, 6) and g_j (E, 6): mirror the triangle, cast.
template <typename scalar_t>
__global__ void ba_unpack_kernel(const double* __restrict__ acc, int64_t E, scalar_t* __restrict__ H_out,
                                 scalar_t* __restrict__ g_out) {
  constexpr int kPerEdge = 36 + 6;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= E * kPerEdge) return;
  const int64_t e = t / kPerEdge;
  const int k = static_cast<int>(t % kPerEdge);
  const double* a = acc + e * kPacked;
  if (k < 36) {
    const int i = k / 6, j = k % 6;
    H_out[e * 36 + k] = static_cast<scalar_t>(a[i <= j ? packed_index<6>(i, j) : packed_index<6>(j, i)]);
  } else {
    g_out[e * 6 + (k - 36)] = static_cast<scalar_t>(a[kTriangle + (k - 36)]);
  }
}

// The per-keyframe edge lists (CSR) of ii, uploaded to `like`'s device: offsets (Kf + 1), then the
// edge ids grouped by keyframe, in edge order within a keyframe (a stable sort by ii).
torch::Tensor edge_lists(const torch::Tensor& ii, int64_t Kf, const torch::Tensor& like) {
  const torch::Tensor ii_host = ii.cpu();
  const int64_t E = ii_host.size(0);
  const int64_t* kf = ii_host.data_ptr<int64_t>();
  std::vector<int64_t> csr(static_cast<size_t>(Kf + 1 + E), 0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(kf[e] >= 0 && kf[e] < Kf, "ba_reduce_cuda: ii must index keyframes in [0, ", Kf, "), got ", kf[e]);
    ++csr[static_cast<size_t>(kf[e] + 1)];
  }
  for (int64_t k = 0; k < Kf; ++k) csr[static_cast<size_t>(k + 1)] += csr[static_cast<size_t>(k)];
  std::vector<int64_t> next(csr.begin(), csr.begin() + Kf);
  for (int64_t e = 0; e < E; ++e) csr[static_cast<size_t>(Kf + 1 + next[static_cast<size_t>(kf[e])]++)] = e;

  auto dev = torch::empty({Kf + 1 + E}, like.options().dtype(torch::kLong));
  // From pageable memory: returns once csr is staged, so it may be freed afterwards.
  const cudaError_t err = cudaMemcpyAsync(dev.data_ptr<int64_t>(), csr.data(), csr.size() * sizeof(int64_t),
                                          cudaMemcpyHostToDevice, 0);
  TORCH_CHECK(err == cudaSuccess, "ba_reduce (CUDA): cudaMemcpyAsync failed: ", cudaGetErrorString(err));
  return dev;
}

template <typename scalar_t>
void forward_impl(const torch::Tensor& inv_depth, const torch::Tensor& csr, const torch::Tensor& rel_poses,
                  const torch::Tensor& adjoints, const torch::Tensor& intrinsics, const torch::Tensor& targets,
                  const torch::Tensor& weights, int64_t stride, double min_depth, double robust_scale,
                  std::vector<torch::Tensor>& out) {
  const int64_t Kf = inv_depth.size(0), width = inv_depth.size(2), P = inv_depth.size(1) * width;
  const int64_t E = rel_poses.size(0);
  const int64_t per_kf = (P + kPixelsPerBlock - 1) / kPixelsPerBlock;
  TORCH_CHECK(Kf * per_kf <= std::numeric_limits<int32_t>::max(), "ba_reduce (CUDA): too many keyframes x pixels (K = ",
              Kf, ", h*w = ", P, ") for one launch");
  const scalar_t inv_c2 = robust_scale > 0 ? static_cast<scalar_t>(1.0 / (robust_scale * robust_scale)) : scalar_t(0);
  const torch::Tensor acc = v2d::zeroed_double_buffer(inv_depth, {E, kPacked}, "ba_reduce");
  ba_kernel<scalar_t><<<static_cast<unsigned>(Kf * per_kf), kThreads, 0, 0>>>(
      inv_depth.data_ptr<scalar_t>(), csr.data_ptr<int64_t>(), Kf, rel_poses.data_ptr<scalar_t>(),
      adjoints.data_ptr<scalar_t>(), intrinsics.data_ptr<scalar_t>(), targets.data_ptr<scalar_t>(),
      weights.data_ptr<scalar_t>(), P, width, static_cast<scalar_t>(stride), static_cast<scalar_t>(min_depth),
      inv_c2, static_cast<int>(per_kf), acc.data_ptr<double>(), out[2].data_ptr<scalar_t>(),
      out[3].data_ptr<scalar_t>(), out[4].data_ptr<scalar_t>(), out[5].data_ptr<scalar_t>());
  v2d::check_launch("ba_reduce_cuda (pixels)");
  if (E == 0) return;
  ba_unpack_kernel<scalar_t><<<static_cast<unsigned>(blocks_for(E * (36 + 6))), kThreads, 0, 0>>>(
      acc.data_ptr<double>(), E, out[0].data_ptr<scalar_t>(), out[1].data_ptr<scalar_t>());
  v2d::check_launch("ba_reduce_cuda (unpack)");
}

}  // namespace

std::vector<torch::Tensor> ba_reduce_cuda(const torch::Tensor& inv_depth, const torch::Tensor& ii,
                                          const torch::Tensor& rel_poses, const torch::Tensor& adjoints,
                                          const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                          const torch::Tensor& weights, int64_t stride, double min_depth,
                                          double robust_scale) {
  v2d::check_on_cuda("ba_reduce_cuda", inv_depth);  // bindings.cpp checked the rest (checks.h)
  const c10::DeviceGuard device_guard(inv_depth.device());  // launches go to the inputs' GPU
  const int64_t Kf = inv_depth.size(0), h = inv_depth.size(1), w = inv_depth.size(2), E = ii.size(0);
  const auto opt = inv_depth.options();
  // Every entry is written by the kernels: H_jj and g_j by the unpack, c for every edge and pixel,
  // c_own, h_pp and g_p for every keyframe pixel (zeros for keyframes without edges).
  std::vector<torch::Tensor> out = {torch::empty({E, 6, 6}, opt), torch::empty({E, 6}, opt),
                                    torch::empty({E, h, w, 6}, opt), torch::empty({Kf, h, w, 6}, opt),
                                    torch::empty({Kf, h, w}, opt),   torch::empty({Kf, h, w}, opt)};
  if (Kf == 0 || h * w == 0) {  // nothing to launch over; H_jj and g_j are sums over no pixels
    v2d::zero_on_default_stream(out[0], "ba_reduce");
    v2d::zero_on_default_stream(out[1], "ba_reduce");
    return out;
  }
  const torch::Tensor csr = edge_lists(ii, Kf, inv_depth);
  AT_DISPATCH_FLOATING_TYPES(inv_depth.scalar_type(), "ba_reduce_cuda", [&] {
    forward_impl<scalar_t>(inv_depth, csr, rel_poses, adjoints, intrinsics, targets, weights, stride, min_depth,
                           robust_scale, out);
  });
  return out;
}
