// Helpers shared by the CUDA files (gn_cuda.cu, volume_cuda.cu, ba_cuda.cu).
#pragma once
#include <cuda_runtime.h>
#include <torch/extension.h>

namespace v2d {

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline void check_on_cuda(const char* op, const torch::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got one on ", t.device());
}

// ---- Per-edge reductions of symmetric systems (gn_cuda.cu, ba_cuda.cu) ----

constexpr int kReduceThreads = 256;  // threads per block of the reducing kernels; a multiple of the warp size
constexpr int kWarpSize = 32;
constexpr int kReduceWarps = kReduceThreads / kWarpSize;

// Entries of a K x K symmetric H that are reduced: the upper triangle i <= j, packed row by row, then b (K).
template <int K>
constexpr int kTriangle = K * (K + 1) / 2;
template <int K>
constexpr int kPacked = kTriangle<K> + K;

template <int K>
__host__ __device__ __forceinline__ int packed_index(int i, int j) {  // requires i <= j
  return i * K - i * (i - 1) / 2 + (j - i);
}

// Sums vals[0..N) over the block (of kReduceThreads threads) and atomically adds the N totals into
// out. Every thread of the block must call it (full-warp shuffles and a barrier). It does not end
// with a barrier: a caller that calls it again must synchronise the block first (warp_sums is reused).
template <int N>
__device__ void block_sum_atomic_add(const double (&vals)[N], double* out) {
  static_assert(N <= kReduceThreads, "one thread per reduced value in the last step");
  __shared__ double warp_sums[kReduceWarps][N];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int s = 0; s < N; ++s) {
    double v = vals[s];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][s] = v;
  }
  __syncthreads();
  if (threadIdx.x < N) {
    double total = 0.0;
    for (int w = 0; w < kReduceWarps; ++w) total += warp_sums[w][threadIdx.x];
    atomicAdd(out + threadIdx.x, total);
  }
}

inline int64_t blocks_for(int64_t n) { return (n + kReduceThreads - 1) / kReduceThreads; }

// cudaMemsetAsync, not zero_() / torch::zeros: keeps every step of an op on the same (default)
// stream. All-zero bytes are 0.0 in float and double.
inline void zero_on_default_stream(const torch::Tensor& t, const char* op) {
  if (t.numel() == 0) return;
  const cudaError_t err = cudaMemsetAsync(t.data_ptr(), 0, t.numel() * t.element_size(), 0);
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): cudaMemsetAsync failed: ", cudaGetErrorString(err));
}

inline torch::Tensor zeroed_double_buffer(const torch::Tensor& like, torch::IntArrayRef sizes, const char* op) {
  auto buf = torch::empty(sizes, like.options().dtype(torch::kDouble));
  zero_on_default_stream(buf, op);
  return buf;
}

}  // namespace v2d
