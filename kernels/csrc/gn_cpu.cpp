// CPU (OpenMP via at::parallel_for) implementation of gn_reduce; the per-pixel math is in gn.h.
//
// Work is split into chunks of one edge x kPixelsPerChunk pixels. Each chunk reduces into its own
// slot of a partial buffer (double; blocks of kPixelsPerFlush pixels are summed in the input
// precision first), and the slots are summed in a fixed order afterwards, so the result does not
// depend on the number of threads or their scheduling.
//
// Within a chunk the pixels are processed kLanes at a time: gn.h's per-pixel functions are
// instantiated with Vec, a SIMD vector of pixels (simd.h), and invalid pixels are masked, not
// branched over.
// Each lane keeps its own running sums within a block; the lanes are added in double at the flush.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gn.h"
#include "ops.h"
#include "simd.h"

namespace gn_simd {

// The inputs of n <= N consecutive pixels p, ..., p+n-1 of one edge (flat index idx of p), as
// vectors; lanes past n are padding (d = 0: invalid).
template <typename S, int N>
struct Group {
  Vec<S, N> u, v, d, tu, tv, wu, wv;
  void load(const S* d_ptr, const S* tgt_ptr, const S* w_ptr, int64_t idx, int64_t col, int64_t row, int64_t width,
            int n) {
    if (n == N && col + N <= width) {
      S iota[N];
      for (int l = 0; l < N; ++l) iota[l] = static_cast<S>(l);
      u = Vec<S, N>(static_cast<S>(col)) + Vec<S, N>::load(iota);
      v = Vec<S, N>(static_cast<S>(row));
      d = Vec<S, N>::load(d_ptr + idx);
      load_pairs(tgt_ptr + 2 * idx, tu, tv);
      load_pairs(w_ptr + 2 * idx, wu, wv);
      return;
    }
    S buf[7][N] = {};
    for (int l = 0; l < n; ++l) {
      buf[0][l] = static_cast<S>(col);
      buf[1][l] = static_cast<S>(row);
      buf[2][l] = d_ptr[idx + l];
      buf[3][l] = tgt_ptr[2 * (idx + l)];
      buf[4][l] = tgt_ptr[2 * (idx + l) + 1];
      buf[5][l] = w_ptr[2 * (idx + l)];
      buf[6][l] = w_ptr[2 * (idx + l) + 1];
      if (++col == width) {
        col = 0;
        ++row;
      }
    }
    u = Vec<S, N>::load(buf[0]);
    v = Vec<S, N>::load(buf[1]);
    d = Vec<S, N>::load(buf[2]);
    tu = Vec<S, N>::load(buf[3]);
    tv = Vec<S, N>::load(buf[4]);
    wu = Vec<S, N>::load(buf[5]);
    wv = Vec<S, N>::load(buf[6]);
  }
};

}  // namespace gn_simd

namespace {

using gn_simd::flush;
using gn_simd::Vec;

constexpr int64_t kPixelsPerChunk = 4096;
// Pixels accumulated in the input precision before the running sums are flushed into the chunk's
// double partials: arithmetic in float (no float<->double conversions in the inner loops) with
// rounding error bounded by a 256 / kLanes-term float sum per lane; the lanes, the chunk and the
// edge sums are added in double.
constexpr int64_t kPixelsPerFlush = 256;

template <typename scalar_t, int K>
void forward_impl(const torch::Tensor& inv_depth, const torch::Tensor& rel_poses, const torch::Tensor& intrinsics,
                  const torch::Tensor& targets, const torch::Tensor& weights, double min_depth, torch::Tensor& H_out,
                  torch::Tensor& b_out) {
  constexpr int N = gn_simd::kLanes<scalar_t>;
  using V = Vec<scalar_t, N>;
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
    v2d::GNPixel<V, K> px;
    gn_simd::Group<scalar_t, N> in;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e = c / chunks_per_edge;
      const int64_t p0 = (c % chunks_per_edge) * kPixelsPerChunk;
      const int64_t p1 = std::min(p0 + kPixelsPerChunk, HW);
      double* Hc = partial.data() + c * S;
      v2d::GNCamera<V> cam;
      v2d::gn_camera(rel_ptr + e * 12, intr_ptr + e * 4, md, cam);
      V acc[S];
      for (int s = 0; s < S; ++s) acc[s] = V(scalar_t(0));
      int64_t col = p0 % Wd, row = p0 / Wd;
      for (int64_t q0 = p0; q0 < p1; q0 += kPixelsPerFlush) {
        const int64_t q1 = std::min(q0 + kPixelsPerFlush, p1);
        for (int64_t p = q0; p < q1; p += N) {
          const int n = static_cast<int>(std::min<int64_t>(N, q1 - p));
          in.load(d_ptr, tgt_ptr, w_ptr, e * HW + p, col, row, Wd, n);
          v2d::gn_linearize<V, K>(in.u, in.v, in.d, in.tu, in.tv, in.wu, in.wv, cam, px);
          v2d::gn_accumulate<V, K, V>(px, acc, acc + K * K);
          col += n;
          while (col >= Wd) {
            col -= Wd;
            ++row;
          }
        }
        flush(acc, S, Hc);
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
  constexpr int N = gn_simd::kLanes<scalar_t>;
  using V = Vec<scalar_t, N>;
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
    v2d::GNPixel<V, K> px;
    gn_simd::Group<scalar_t, N> in;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e = c / chunks_per_edge;
      const int64_t p0 = (c % chunks_per_edge) * kPixelsPerChunk;
      const int64_t p1 = std::min(p0 + kPixelsPerChunk, HW);
      double* grel = partial.data() + c * S;
      v2d::GNCamera<V> cam;
      v2d::gn_camera(rel_ptr + e * 12, intr_ptr + e * 4, md, cam);
      // Local (broadcast) copies: the compiler cannot keep values read through gH_ptr in registers
      // while the pixel loop writes the output arrays (possible aliasing).
      V Gs[K * K], g[K];
      for (int i = 0; i < K; ++i) {
        g[i] = V(gb_ptr[e * K + i]);
        for (int j = 0; j < K; ++j) Gs[i * K + j] = V(gH_ptr[(e * K + i) * K + j] + gH_ptr[(e * K + j) * K + i]);
      }
      V acc[S];
      for (int s = 0; s < S; ++s) acc[s] = V(scalar_t(0));
      int64_t col = p0 % Wd, row = p0 / Wd;
      for (int64_t q0 = p0; q0 < p1; q0 += kPixelsPerFlush) {
        const int64_t q1 = std::min(q0 + kPixelsPerFlush, p1);
        for (int64_t p = q0; p < q1; p += N) {
          const int64_t idx = e * HW + p;
          const int n = static_cast<int>(std::min<int64_t>(N, q1 - p));
          in.load(d_ptr, tgt_ptr, w_ptr, idx, col, row, Wd, n);
          v2d::gn_linearize<V, K>(in.u, in.v, in.d, in.tu, in.tv, in.wu, in.wv, cam, px);
          V gd, gt[2], gw[2];
          v2d::gn_pixel_backward<V, K, V>(px, cam, Gs, g, gd, gt, gw, acc);
          if (n == N) {
            gd.store(gd_ptr + idx);
            gn_simd::store_pairs(gt_ptr + 2 * idx, gt[0], gt[1]);
            gn_simd::store_pairs(gw_ptr + 2 * idx, gw[0], gw[1]);
          } else {
            for (int l = 0; l < n; ++l) {
              gd_ptr[idx + l] = gd[l];
              gt_ptr[2 * (idx + l)] = gt[0][l];
              gt_ptr[2 * (idx + l) + 1] = gt[1][l];
              gw_ptr[2 * (idx + l)] = gw[0][l];
              gw_ptr[2 * (idx + l) + 1] = gw[1][l];
            }
          }
          col += n;
          while (col >= Wd) {
            col -= Wd;
            ++row;
          }
        }
        flush(acc, S, grel);
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
