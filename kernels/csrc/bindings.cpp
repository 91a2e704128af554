// Python bindings of kernels._C. Each op is routed by the device of its first tensor; every tensor
// must be on that device, contiguous, of one floating dtype and of consistent shapes (checks.h;
// ops.py checks this with friendlier messages first). An unsupported device is an error, never a no-op.
#include "checks.h"
#include "ops.h"

namespace {

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": tensors are on a CUDA device but kernels._C was built without CUDA "
                         "(rebuild with FORCE_CUDA=1 on a machine with the CUDA toolkit)");
}

#define V2D_ROUTE(op, first, ...)                                                             \
  do {                                                                                        \
    if ((first).is_cpu()) return op##_cpu(__VA_ARGS__);                                       \
    if ((first).is_cuda()) {                                                                  \
      V2D_CUDA_CALL(op, __VA_ARGS__);                                                         \
    }                                                                                         \
    TORCH_CHECK(false, #op, ": unsupported device ", (first).device());                       \
  } while (0)

#ifdef V2D_WITH_CUDA
#define V2D_CUDA_CALL(op, ...) return op##_cuda(__VA_ARGS__)
#else
#define V2D_CUDA_CALL(op, ...) no_cuda(#op)
#endif

std::vector<torch::Tensor> gn_reduce_forward(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                             const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                             const torch::Tensor& weights, double min_depth, bool with_focal) {
  v2d::check_same({inv_depth, rel_poses, intrinsics, targets, weights}, "gn_reduce_forward");
  v2d::check_gn_shapes("gn_reduce_forward", inv_depth, rel_poses, intrinsics, targets, weights);
  V2D_ROUTE(gn_reduce_forward, inv_depth, inv_depth, rel_poses, intrinsics, targets, weights, min_depth, with_focal);
}

std::vector<torch::Tensor> gn_reduce_backward(const torch::Tensor& grad_H, const torch::Tensor& grad_b,
                                              const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                              const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                              const torch::Tensor& weights, double min_depth, bool with_focal) {
  v2d::check_same({grad_H, grad_b, inv_depth, rel_poses, intrinsics, targets, weights}, "gn_reduce_backward");
  v2d::check_gn_shapes("gn_reduce_backward", inv_depth, rel_poses, intrinsics, targets, weights);
  v2d::check_gn_grads("gn_reduce_backward", inv_depth, grad_H, grad_b, with_focal);
  V2D_ROUTE(gn_reduce_backward, inv_depth, grad_H, grad_b, inv_depth, rel_poses, intrinsics, targets, weights,
            min_depth, with_focal);
}

torch::Tensor backproject_volume_forward(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                         const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  v2d::check_same({features, rel_poses, intrinsics, depths}, "backproject_volume_forward");
  v2d::check_volume_shapes("backproject_volume_forward", features, rel_poses, intrinsics, depths);
  V2D_ROUTE(backproject_volume_forward, features, features, rel_poses, intrinsics, depths);
}

std::vector<torch::Tensor> backproject_volume_backward(const torch::Tensor& grad_volume,
                                                       const torch::Tensor& features,
                                                       const torch::Tensor& rel_poses,
                                                       const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  v2d::check_same({grad_volume, features, rel_poses, intrinsics, depths}, "backproject_volume_backward");
  v2d::check_volume_shapes("backproject_volume_backward", features, rel_poses, intrinsics, depths);
  v2d::check_volume_grad("backproject_volume_backward", grad_volume, features, depths);
  V2D_ROUTE(backproject_volume_backward, features, grad_volume, features, rel_poses, intrinsics, depths);
}

std::vector<torch::Tensor> ba_reduce(const torch::Tensor& inv_depth, const torch::Tensor& ii,
                                     const torch::Tensor& rel_poses, const torch::Tensor& adjoints,
                                     const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                     const torch::Tensor& weights, int64_t stride, double min_depth,
                                     double robust_scale) {
  v2d::check_same({inv_depth, rel_poses, adjoints, intrinsics, targets, weights}, "ba_reduce");
  v2d::check_ba_shapes("ba_reduce", inv_depth, ii, rel_poses, adjoints, intrinsics, targets, weights, stride);
  V2D_ROUTE(ba_reduce, inv_depth, inv_depth, ii, rel_poses, adjoints, intrinsics, targets, weights, stride, min_depth,
            robust_scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gn_reduce_forward", &gn_reduce_forward, "Gauss-Newton normal equations per edge (forward)");
  m.def("gn_reduce_backward", &gn_reduce_backward, "Gauss-Newton normal equations per edge (backward)");
  m.def("backproject_volume_forward", &backproject_volume_forward, "Cost-volume back-projection (forward)");
  m.def("backproject_volume_backward", &backproject_volume_backward, "Cost-volume back-projection (backward)");
  m.def("ba_reduce", &ba_reduce, "Window bundle adjustment: per-edge and per-pixel Gauss-Newton terms");
#ifdef V2D_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
