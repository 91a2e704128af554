// CUDA implementation of backproject_volume; the per-sample math is in volume.h (shared with
// volume_cpu.cpp). One thread per (m, d, pixel) projects once and loops over channels.
// Backward scatters feature gradients with atomicAdd and adds each thread's 12 pose-gradient
// values atomically into a per-neighbour double buffer (simple, not tuned: it has never run
// here, there is no GPU; `make cuda-check` shows it compiles). Default stream, as gn_cuda.cu.
#include <cuda_runtime.h>

#include "ops.h"
#include "volume.h"

namespace {

constexpr int kThreads = 256;

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda_inputs(const char* op, const std::vector<torch::Tensor>& ts) {
  const auto& ref = ts.front();
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected CUDA tensors on one device");
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": all tensors must have one dtype");
    TORCH_CHECK(t.is_contiguous(), op, ": tensors must be contiguous");
  }
}

template <typename T>
__global__ void forward_kernel(const T* f, const T* rel, const T* intr, const T* z, T* out, int64_t M, int64_t C,
                               int64_t D, int h, int w) {
  const int64_t hw = int64_t(h) * w;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * D * hw) return;
  const int64_t p = i % hw, d = (i / hw) % D, m = i / (hw * D);
  v2d::VolumeSample<T> s;
  const bool ok = v2d::volume_project<T>(T(p % w), T(p / w), z[d], rel + 12 * m, intr + 4 * m, s);
  for (int64_t c = 0; c < C; ++c)
    out[((m * C + c) * D + d) * hw + p] = ok ? v2d::volume_sample<T>(f + (m * C + c) * hw, h, w, s) : T(0);
}

template <typename T>
__global__ void backward_kernel(const T* g, const T* f, const T* rel, const T* intr, const T* z, T* gf, double* grel,
                                int64_t M, int64_t C, int64_t D, int h, int w) {
  const int64_t hw = int64_t(h) * w;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * D * hw) return;
  const int64_t p = i % hw, d = (i / hw) % D, m = i / (hw * D);
  v2d::VolumeSample<T> s;
  if (!v2d::volume_project<T>(T(p % w), T(p / w), z[d], rel + 12 * m, intr + 4 * m, s)) return;
  const T wts[4] = {(1 - s.wx) * (1 - s.wy), s.wx * (1 - s.wy), (1 - s.wx) * s.wy, s.wx * s.wy};
  const int xs[4] = {s.x0, s.x0 + 1, s.x0, s.x0 + 1}, ys[4] = {s.y0, s.y0, s.y0 + 1, s.y0 + 1};
  double gu = 0, gv = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T go = g[((m * C + c) * D + d) * hw + p];
    T* plane = gf + (m * C + c) * hw;
    for (int k = 0; k < 4; ++k)
      if (xs[k] >= 0 && xs[k] < w && ys[k] >= 0 && ys[k] < h) atomicAdd(plane + ys[k] * w + xs[k], wts[k] * go);
    T du, dv;
    v2d::volume_sample_grad_uv<T>(f + (m * C + c) * hw, h, w, s, du, dv);
    gu += double(go) * du;
    gv += double(go) * dv;
  }
  double acc[12] = {0};
  v2d::volume_pose_grad<T, double>(s, intr + 4 * m, gu, gv, acc);
  for (int k = 0; k < 12; ++k) atomicAdd(grel + 12 * m + k, acc[k]);
}

}  // namespace

torch::Tensor backproject_volume_forward_cuda(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                              const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  check_cuda_inputs("backproject_volume_forward", {features, rel_poses, intrinsics, depths});
  const c10::DeviceGuard device_guard(features.device());
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t D = depths.size(0);
  auto out = torch::zeros({M, C, D, h, w}, features.options());
  const int64_t n = M * D * h * w;
  if (n == 0) return out;
  const int blocks = static_cast<int>((n + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks, kThreads, 0, 0>>>(
        features.data_ptr<scalar_t>(), rel_poses.data_ptr<scalar_t>(), intrinsics.data_ptr<scalar_t>(),
        depths.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, C, D, static_cast<int>(h), static_cast<int>(w));
  });
  check_launch("backproject_volume_forward_cuda");
  return out;
}

std::vector<torch::Tensor> backproject_volume_backward_cuda(const torch::Tensor& grad_volume,
                                                            const torch::Tensor& features,
                                                            const torch::Tensor& rel_poses,
                                                            const torch::Tensor& intrinsics,
                                                            const torch::Tensor& depths) {
  check_cuda_inputs("backproject_volume_backward", {grad_volume, features, rel_poses, intrinsics, depths});
  const c10::DeviceGuard device_guard(features.device());
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t D = depths.size(0);
  TORCH_CHECK(grad_volume.dim() == 5 && grad_volume.size(0) == M && grad_volume.size(1) == C &&
                  grad_volume.size(2) == D && grad_volume.size(3) == h && grad_volume.size(4) == w,
              "backproject_volume_backward: grad_volume must be (M, C, D, h, w)");
  auto g_feat = torch::zeros_like(features);
  auto g_rel64 = torch::zeros({M, 3, 4}, features.options().dtype(torch::kDouble));
  const int64_t n = M * D * h * w;
  if (n > 0) {
    const int blocks = static_cast<int>((n + kThreads - 1) / kThreads);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_backward_cuda", [&] {
      backward_kernel<scalar_t><<<blocks, kThreads, 0, 0>>>(
          grad_volume.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), rel_poses.data_ptr<scalar_t>(),
          intrinsics.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(), g_feat.data_ptr<scalar_t>(),
          g_rel64.data_ptr<double>(), M, C, D, static_cast<int>(h), static_cast<int>(w));
    });
    check_launch("backproject_volume_backward_cuda");
  }
  return {g_feat, g_rel64.to(features.scalar_type())};
}
