// Entry points of the kernels, one per device. bindings.cpp routes a call to the right one by the
// device of its inputs; the per-pixel math they share lives in gn.h and volume.h.
#pragma once
#include <torch/extension.h>

#include <vector>

// ---- Kernel A: Gauss-Newton normal equations (see gn.h for the math and conventions) ----
// inv_depth (E,H,W), rel_poses (E,3,4), intrinsics (E,4), targets (E,H,W,2), weights (E,H,W,2)
// -> {H (E,K,K), b (E,K)} with K = 6, or 7 with the focal-length column.
std::vector<torch::Tensor> gn_reduce_forward_cpu(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                 const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                 const torch::Tensor& weights, double min_depth, bool with_focal);
// -> {grad_inv_depth (E,H,W), grad_rel_poses (E,3,4), grad_intrinsics (E,4), grad_targets (E,H,W,2),
//     grad_weights (E,H,W,2)}
std::vector<torch::Tensor> gn_reduce_backward_cpu(const torch::Tensor& grad_H, const torch::Tensor& grad_b,
                                                  const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                  const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                  const torch::Tensor& weights, double min_depth, bool with_focal);

// ---- Kernel B: cost-volume back-projection (see volume.h) ----
// features (M,C,h,w), rel_poses (M,3,4), intrinsics (M,4), depths (D) -> volume (M,C,D,h,w)
torch::Tensor backproject_volume_forward_cpu(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                             const torch::Tensor& intrinsics, const torch::Tensor& depths);
// -> {grad_features (M,C,h,w), grad_rel_poses (M,3,4)}
std::vector<torch::Tensor> backproject_volume_backward_cpu(const torch::Tensor& grad_volume,
                                                           const torch::Tensor& features,
                                                           const torch::Tensor& rel_poses,
                                                           const torch::Tensor& intrinsics,
                                                           const torch::Tensor& depths);

// ---- Kernel C: window bundle adjustment, per-edge and per-pixel terms (see ba.h) ----
// inv_depth (K,h,w), ii (E) int64, rel_poses (E,3,4), adjoints (E,6,6), intrinsics (4), targets (E,h,w,2),
// weights (E,h,w) -> {H_jj (E,6,6), g_j (E,6), c (E,h,w,6), c_own (K,h,w,6), h_pp (K,h,w), g_p (K,h,w)}
std::vector<torch::Tensor> ba_reduce_cpu(const torch::Tensor& inv_depth, const torch::Tensor& ii,
                                         const torch::Tensor& rel_poses, const torch::Tensor& adjoints,
                                         const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                         const torch::Tensor& weights, int64_t stride, double min_depth,
                                         double robust_scale);

#ifdef V2D_WITH_CUDA
std::vector<torch::Tensor> gn_reduce_forward_cuda(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                  const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                  const torch::Tensor& weights, double min_depth, bool with_focal);
std::vector<torch::Tensor> gn_reduce_backward_cuda(const torch::Tensor& grad_H, const torch::Tensor& grad_b,
                                                   const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                   const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                   const torch::Tensor& weights, double min_depth, bool with_focal);
torch::Tensor backproject_volume_forward_cuda(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                              const torch::Tensor& intrinsics, const torch::Tensor& depths);
std::vector<torch::Tensor> backproject_volume_backward_cuda(const torch::Tensor& grad_volume,
                                                            const torch::Tensor& features,
                                                            const torch::Tensor& rel_poses,
                                                            const torch::Tensor& intrinsics,
                                                            const torch::Tensor& depths);
std::vector<torch::Tensor> ba_reduce_cuda(const torch::Tensor& inv_depth, const torch::Tensor& ii,
                                          const torch::Tensor& rel_poses, const torch::Tensor& adjoints,
                                          const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                          const torch::Tensor& weights, int64_t stride, double min_depth,
                                          double robust_scale);
#endif
