// CPU (OpenMP via at::parallel_for) implementation of gn_reduce; the per-pixel math is in gn.h.
//
// Work is split into chunks of one edge x kPixelsPerChunk pixels. Each chunk reduces into its own
// slot of a partial buffer (double; blocks of kPixelsPerFlush pixels are summed in the input
// precision first), and the slots are summed in a fixed order afterwards, so the result does not
// depend on the number of threads or their scheduling.
#include <ATen/Parallel.h>

#include "gn.h"
#include "ops.h"

namespace {

constexpr int64_t kPixelsPerChunk = 4096;
// Pixels accumulated in the input precision before the running sums are flushed into the chunk's
// double partials: arithmetic in float (no float<->double conversions in the inner loops) with
// rounding error bounded by a 256-term float sum; the chunk and edge sums stay in double.
constexpr int64_t kPixelsPerFlush = 256;

template <typename scalar_t, int K>
void forward_impl(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses, const torch::Tensor& intrinsics,
                  const torch::Tensor& targets, const torch::Tensor& weights, double min_depth, torch::Tensor& H_out,
                  torch::Tensor& b_out) {
  const int64_t E = inv_depth.size(0), Ht = inv_depth.size(1), Wd = inv_depth.size(2);
  const int64_t HW = Ht * Wd;
  const int64_t chunks_per_edge = (HW + kPixelsPerChunk - 1) / kPixelsPerChunk;
  const int64_t n_chunks = E * chunks_per_edge;
  constexpr int S = K * K + K;
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(n_chunks, 1)) * S, 0.0);

  const scalar_t* d_ptr = inv_depth.data_ptr<scalar_t>();
  const scalar_t* rel_ptr = rel_poses.data_ptr<scalar_t>();
  const scalar_t* intr_ptr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* tgt_ptr = targets.data_ptr<scalar_t>();
  const scalar_t* w_ptr = weights.data_ptr<scalar_t>();
  const scalar_t md = static_cast<scalar_t>(min_depth);

  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    v2d::GNPixel<scalar_t, K> px;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e = c / chunks_per_edge;
      const int64_t p0 = (c % chunks_per_edge) * kPixelsPerChunk;
      const int64_t p1 = std::min(p0 + kPixelsPerChunk, HW);
      double* Hc = partial.data() + c * S;
      const scalar_t* rel = rel_ptr + e * 12;
      const scalar_t* intr = intr_ptr + e * 4;
      for (int64_t q0 = p0; q0 < p1; q0 += kPixelsPerFlush) {
        scalar_t acc[S] = {0};
        for (int64_t p = q0; p < std::min(q0 + kPixelsPerFlush, p1); ++p) {
          const int64_t idx = e * HW + p;
          const scalar_t u = static_cast<scalar_t>(p % Wd), v = static_cast<scalar_t>(p / Wd);
          if (v2d::gn_linearize<scalar_t, K>(u, v, d_ptr[idx], rel, intr, tgt_ptr + 2 * idx, w_ptr + 2 * idx, md,
                                             px))
            v2d::gn_accumulate<scalar_t, K, scalar_t>(px, acc, acc + K * K);
        }
        for (int s = 0; s < S; ++s) Hc[s] += acc[s];
      }
    }
  });

  auto H_acc = H_out.accessor<scalar_t, 3>();
  auto b_acc = b_out.accessor<scalar_t, 2>();
  for (int64_t e = 0; e < E; ++e) {
    double sum[S] = {0};
    for (int64_t c = e * chunks_per_edge; c < (e + 1) * chunks_per_edge; ++c)
      for (int s = 0; s < S; ++s) sum[s] += partial[c * S + s];
    for (int i = 0; i < K; ++i) {
      for (int j = i; j < K; ++j) {
        H_acc[e][i][j] = static_cast<scalar_t>(sum[i * K + j]);
        H_acc[e][j][i] = static_cast<scalar_t>(sum[i * K + j]);
      }
      b_acc[e][i] = static_cast<scalar_t>(sum[K * K + i]);
    }
  }
}

template <typename scalar_t, int K>
void backward_impl(const torch::Tensor& grad_H, const torch::Tensor& grad_b, const torch::Tensor& inv_depth,
                   const torch::Tensor& rel_poses, const torch::Tensor& intrinsics, const torch::Tensor& targets,
                   const torch::Tensor& weights, double min_depth, torch::Tensor& g_d, torch::Tensor& g_rel,
                   torch::Tensor& g_intr, torch::Tensor& g_t, torch::Tensor& g_w) {
  constexpr int S = v2d::kGNEdgeGrads;
  const int64_t E = inv_depth.size(0), Ht = inv_depth.size(1), Wd = inv_depth.size(2);
  const int64_t HW = Ht * Wd;
  const int64_t chunks_per_edge = (HW + kPixelsPerChunk - 1) / kPixelsPerChunk;
  const int64_t n_chunks = E * chunks_per_edge;
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(n_chunks, 1)) * S, 0.0);

  const scalar_t* gH_ptr = grad_H.data_ptr<scalar_t>();
  const scalar_t* gb_ptr = grad_b.data_ptr<scalar_t>();
  const scalar_t* d_ptr = inv_depth.data_ptr<scalar_t>();
  const scalar_t* rel_ptr = rel_poses.data_ptr<scalar_t>();
  const scalar_t* intr_ptr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* tgt_ptr = targets.data_ptr<scalar_t>();
  const scalar_t* w_ptr = weights.data_ptr<scalar_t>();
  scalar_t* gd_ptr = g_d.data_ptr<scalar_t>();
  scalar_t* gt_ptr = g_t.data_ptr<scalar_t>();
  scalar_t* gw_ptr = g_w.data_ptr<scalar_t>();
  const scalar_t md = static_cast<scalar_t>(min_depth);

  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    v2d::GNPixel<scalar_t, K> px;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e = c / chunks_per_edge;
      const int64_t p0 = (c % chunks_per_edge) * kPixelsPerChunk;
      const int64_t p1 = std::min(p0 + kPixelsPerChunk, HW);
      double* grel = partial.data() + c * S;
      const scalar_t* rel = rel_ptr + e * 12;
      const scalar_t* intr = intr_ptr + e * 4;
      // Local copies: the compiler cannot keep values read through gH_ptr in registers while the
      // pixel loop writes the output arrays (possible aliasing).
      scalar_t Gs[K * K], g[K];
      for (int i = 0; i < K; ++i) {
        g[i] = gb_ptr[e * K + i];
        for (int j = 0; j < K; ++j) Gs[i * K + j] = gH_ptr[(e * K + i) * K + j] + gH_ptr[(e * K + j) * K + i];
      }
      for (int64_t q0 = p0; q0 < p1; q0 += kPixelsPerFlush) {
        scalar_t acc[S] = {0};
        for (int64_t p = q0; p < std::min(q0 + kPixelsPerFlush, p1); ++p) {
          const int64_t idx = e * HW + p;
          const scalar_t u = static_cast<scalar_t>(p % Wd), v = static_cast<scalar_t>(p / Wd);
          if (v2d::gn_linearize<scalar_t, K>(u, v, d_ptr[idx], rel, intr, tgt_ptr + 2 * idx, w_ptr + 2 * idx, md,
                                             px)) {
            v2d::gn_pixel_backward<scalar_t, K, scalar_t>(px, rel, intr, Gs, g, gd_ptr[idx], gt_ptr + 2 * idx,
                                                          gw_ptr + 2 * idx, acc);
          } else {
            gd_ptr[idx] = 0;
            gt_ptr[2 * idx] = gt_ptr[2 * idx + 1] = 0;
            gw_ptr[2 * idx] = gw_ptr[2 * idx + 1] = 0;
          }
        }
        for (int s = 0; s < S; ++s) grel[s] += acc[s];
      }
    }
  });

  auto grel_acc = g_rel.accessor<scalar_t, 3>();
  auto gintr_acc = g_intr.accessor<scalar_t, 2>();
  for (int64_t e = 0; e < E; ++e) {
    double sum[S] = {0};
    for (int64_t c = e * chunks_per_edge; c < (e + 1) * chunks_per_edge; ++c)
      for (int s = 0; s < S; ++s) sum[s] += partial[c * S + s];
    for (int s = 0; s < 12; ++s) grel_acc[e][s / 4][s % 4] = static_cast<scalar_t>(sum[s]);
    for (int s = 0; s < 4; ++s) gintr_acc[e][s] = static_cast<scalar_t>(sum[12 + s]);
  }
}

}  // namespace

std::vector<torch::Tensor> gn_reduce_forward_cpu(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                 const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                 const torch::Tensor& weights, double min_depth, bool with_focal) {
  const int64_t E = inv_depth.size(0);
  const int64_t K = with_focal ? 7 : 6;
  auto H = torch::zeros({E, K, K}, inv_depth.options());
  auto b = torch::zeros({E, K}, inv_depth.options());
  AT_DISPATCH_FLOATING_TYPES(inv_depth.scalar_type(), "gn_reduce_forward_cpu", [&] {
    if (with_focal)
      forward_impl<scalar_t, 7>(inv_depth, rel_poses, intrinsics, targets, weights, min_depth, H, b);
    else
      forward_impl<scalar_t, 6>(inv_depth, rel_poses, intrinsics, targets, weights, min_depth, H, b);
  });
  return {H, b};
}

std::vector<torch::Tensor> gn_reduce_backward_cpu(const torch::Tensor& grad_H, const torch::Tensor& grad_b,
                                                  const torch::Tensor& inv_depth, const torch::Tensor& rel_poses,
                                                  const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                                  const torch::Tensor& weights, double min_depth, bool with_focal) {
  auto g_d = torch::empty_like(inv_depth);
  auto g_rel = torch::zeros_like(rel_poses);
  auto g_intr = torch::zeros_like(intrinsics);
  auto g_t = torch::empty_like(targets);
  auto g_w = torch::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES(inv_depth.scalar_type(), "gn_reduce_backward_cpu", [&] {
    if (with_focal)
      backward_impl<scalar_t, 7>(grad_H, grad_b, inv_depth, rel_poses, intrinsics, targets, weights, min_depth, g_d,
                                 g_rel, g_intr, g_t, g_w);
    else
      backward_impl<scalar_t, 6>(grad_H, grad_b, inv_depth, rel_poses, intrinsics, targets, weights, min_depth, g_d,
                                 g_rel, g_intr, g_t, g_w);
  });
  return {g_d, g_rel, g_intr, g_t, g_w};
}
