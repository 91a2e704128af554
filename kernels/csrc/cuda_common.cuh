// Helpers shared by the CUDA files (gn_cuda.cu, volume_cuda.cu).
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

}  // namespace v2d
