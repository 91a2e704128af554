// Argument checks shared by every entry point (bindings.cpp calls them before routing to a device),
// so the CPU and CUDA implementations can index without re-checking. ops.py checks the same things
// first with friendlier messages; these are the last line, and on the GPU a wrong shape would be an
// out-of-bounds read rather than an error.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace v2d {

inline void check_same(const std::vector<torch::Tensor>& ts, const char* op) {
  const auto& ref = ts.front();
  for (const auto& t : ts) {
    TORCH_CHECK(t.device() == ref.device(), op, ": all tensors must be on one device, got ", ref.device(), " and ",
                t.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": all tensors must have one dtype, got ",
                ref.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": tensors must be contiguous");
  }
  TORCH_CHECK(ref.scalar_type() == torch::kFloat || ref.scalar_type() == torch::kDouble, op,
              ": only float32 and float64 are supported, got ", ref.scalar_type());
}

inline void check_gn_shapes(const char* op, const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                            const torch::Tensor& intrinsics, const torch::Tensor& targets,
                            const torch::Tensor& weights) {
  TORCH_CHECK(inv_depth.dim() == 3, op, ": inv_depth must be (E, H, W), got ", inv_depth.sizes());
  const int64_t E = inv_depth.size(0), Ht = inv_depth.size(1), Wd = inv_depth.size(2);
  TORCH_CHECK(rel_poses.sizes() == torch::IntArrayRef({E, 3, 4}), op, ": rel_poses must be (E, 3, 4) with E = ", E,
              ", got ", rel_poses.sizes());
  TORCH_CHECK(intrinsics.sizes() == torch::IntArrayRef({E, 4}), op, ": intrinsics must be (E, 4) with E = ", E,
              ", got ", intrinsics.sizes());
  TORCH_CHECK(targets.sizes() == torch::IntArrayRef({E, Ht, Wd, 2}), op, ": targets must be (E, H, W, 2) = (", E,
              ", ", Ht, ", ", Wd, ", 2), got ", targets.sizes());
  TORCH_CHECK(weights.sizes() == torch::IntArrayRef({E, Ht, Wd, 2}), op, ": weights must be (E, H, W, 2) = (", E,
              ", ", Ht, ", ", Wd, ", 2), got ", weights.sizes());
}

inline void check_gn_grads(const char* op, const torch::Tensor& inv_depth, const torch::Tensor& grad_H,
                           const torch::Tensor& grad_b, bool with_focal) {
  const int64_t E = inv_depth.size(0), K = with_focal ? 7 : 6;
  TORCH_CHECK(grad_H.sizes() == torch::IntArrayRef({E, K, K}), op, ": grad_H must be (E, K, K) = (", E, ", ", K,
              ", ", K, "), got ", grad_H.sizes());
  TORCH_CHECK(grad_b.sizes() == torch::IntArrayRef({E, K}), op, ": grad_b must be (E, K) = (", E, ", ", K,
              "), got ", grad_b.sizes());
}

inline void check_volume_shapes(const char* op, const torch::Tensor& features, const torch::Tensor& rel_poses,
                                const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  TORCH_CHECK(features.dim() == 4, op, ": features must be (M, C, h, w), got ", features.sizes());
  const int64_t M = features.size(0);
  TORCH_CHECK(rel_poses.sizes() == torch::IntArrayRef({M, 3, 4}), op, ": rel_poses must be (M, 3, 4) with M = ", M,
              ", got ", rel_poses.sizes());
  TORCH_CHECK(intrinsics.sizes() == torch::IntArrayRef({M, 4}), op, ": intrinsics must be (M, 4) with M = ", M,
              ", got ", intrinsics.sizes());
  TORCH_CHECK(depths.dim() == 1, op, ": depths must be (D,), got ", depths.sizes());
}

inline void check_volume_grad(const char* op, const torch::Tensor& grad, const torch::Tensor& features,
                              const torch::Tensor& depths) {
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  TORCH_CHECK(grad.sizes() == torch::IntArrayRef({M, C, depths.size(0), h, w}), op,
              ": grad_volume must be (M, C, D, h, w) = (", M, ", ", C, ", ", depths.size(0), ", ", h, ", ", w,
              "), got ", grad.sizes());
}

inline void check_ba_shapes(const char* op, const torch::Tensor& inv_depth, const torch::Tensor& ii,
                            const torch::Tensor& rel_poses, const torch::Tensor& adjoints,
                            const torch::Tensor& intrinsics, const torch::Tensor& targets,
                            const torch::Tensor& weights, int64_t stride) {
  TORCH_CHECK(inv_depth.dim() == 3, op, ": inv_depth must be (K, h, w), got ", inv_depth.sizes());
  const int64_t Kf = inv_depth.size(0), h = inv_depth.size(1), w = inv_depth.size(2);
  TORCH_CHECK(ii.dim() == 1 && ii.scalar_type() == torch::kLong && ii.device() == inv_depth.device() &&
                  ii.is_contiguous(),
              op, ": ii must be a contiguous int64 (E,) tensor on ", inv_depth.device());
  const int64_t E = ii.size(0);
  if (E > 0) {
    const auto lo = ii.min().item<int64_t>(), hi = ii.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < Kf, op, ": ii must index keyframes in [0, ", Kf, "), got [", lo, ", ", hi, "]");
  }
  TORCH_CHECK(rel_poses.sizes() == torch::IntArrayRef({E, 3, 4}), op, ": rel_poses must be (E, 3, 4) with E = ", E,
              ", got ", rel_poses.sizes());
  TORCH_CHECK(adjoints.sizes() == torch::IntArrayRef({E, 6, 6}), op, ": adjoints must be (E, 6, 6) with E = ", E,
              ", got ", adjoints.sizes());
  TORCH_CHECK(intrinsics.sizes() == torch::IntArrayRef({4}), op, ": intrinsics must be (4,), got ",
              intrinsics.sizes());
  TORCH_CHECK(targets.sizes() == torch::IntArrayRef({E, h, w, 2}), op, ": targets must be (E, h, w, 2) = (", E,
              ", ", h, ", ", w, ", 2), got ", targets.sizes());
  TORCH_CHECK(weights.sizes() == torch::IntArrayRef({E, h, w}), op, ": weights must be (E, h, w) = (", E, ", ", h,
              ", ", w, "), got ", weights.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
}

}  // namespace v2d
