// CPU (OpenMP via at::parallel_for) implementation of ba_reduce; the per-pixel math is in ba.h.
//
// Work is split into chunks of one keyframe x kPixelsPerChunk pixels; a chunk visits every edge out
// of its keyframe for each vector of pixels, so it owns those pixels' outputs (c_own, h_pp, g_p are
// summed over the edges in registers, in edge order) and writes each edge's coupling c directly.
// The per-edge sums H_jj, g_j go to the chunk's own slot of a partial buffer (double), and the
// slots are added in a fixed order afterwards: the result does not depend on the number of threads
// or on their scheduling (the synchronous SLAM mode relies on this).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ba.h"
#include "ops.h"
#include "simd.h"

namespace {

using gn_simd::flush;
using gn_simd::Vec;

constexpr int64_t kPixelsPerChunk = 2048;
constexpr int64_t kPixelsPerFlush = 256;  // as gn_cpu.cpp: float sums stay short before the double flush
constexpr int kSlot = 36 + 6;             // per edge: H_jj (upper triangle written), g_j

// Scatter the lanes of n vectors vals[0..n) of pixels p..p+m-1 into out[(p + l) * n + i].
template <typename S, int N>
inline void store_rows(const Vec<S, N>* vals, int n, S* out, int64_t p, int m) {
  for (int l = 0; l < m; ++l)
    for (int i = 0; i < n; ++i) out[(p + l) * n + i] = vals[i][l];
}

template <typename scalar_t>
void forward_impl(const torch::Tensor& inv_depth, const torch::Tensor& ii, const torch::Tensor& rel_poses,
                  const torch::Tensor& adjoints, const torch::Tensor& intrinsics, const torch::Tensor& targets,
                  const torch::Tensor& weights, int64_t stride, double min_depth, double robust_scale,
                  std::vector<torch::Tensor>& out) {
  constexpr int N = gn_simd::kLanes<scalar_t>;
  using V = Vec<scalar_t, N>;
  const int64_t Kf = inv_depth.size(0), h = inv_depth.size(1), w = inv_depth.size(2), P = h * w;
  const int64_t E = ii.size(0);

  // Edges grouped by source keyframe, in edge order.
  const int64_t* ii_ptr = ii.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> edges_of(static_cast<size_t>(Kf));
  for (int64_t e = 0; e < E; ++e) edges_of[static_cast<size_t>(ii_ptr[e])].push_back(e);
  const int64_t blocks = (P + kPixelsPerChunk - 1) / kPixelsPerChunk;
  std::vector<int64_t> chunk_kf;
  for (int64_t k = 0; k < Kf; ++k)
    if (!edges_of[static_cast<size_t>(k)].empty())
      for (int64_t b = 0; b < blocks; ++b) chunk_kf.push_back(k);
  const int64_t n_chunks = static_cast<int64_t>(chunk_kf.size());
  // partial[(b * E + e) * kSlot]: block b of edge e's keyframe.
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(blocks * E, 1)) * kSlot, 0.0);

  const scalar_t* d_ptr = inv_depth.data_ptr<scalar_t>();
  const scalar_t* rel_ptr = rel_poses.data_ptr<scalar_t>();
  const scalar_t* adj_ptr = adjoints.data_ptr<scalar_t>();
  const scalar_t* intr_ptr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* tgt_ptr = targets.data_ptr<scalar_t>();
  const scalar_t* w_ptr = weights.data_ptr<scalar_t>();
  scalar_t* c_ptr = out[2].data_ptr<scalar_t>();
  scalar_t* own_ptr = out[3].data_ptr<scalar_t>();
  scalar_t* hpp_ptr = out[4].data_ptr<scalar_t>();
  scalar_t* gp_ptr = out[5].data_ptr<scalar_t>();
  const scalar_t md = static_cast<scalar_t>(min_depth);
  const V inv_c2(robust_scale > 0 ? static_cast<scalar_t>(1.0 / (robust_scale * robust_scale)) : scalar_t(0));
  const scalar_t s = static_cast<scalar_t>(stride);
  scalar_t lane[N];
  for (int l = 0; l < N; ++l) lane[l] = static_cast<scalar_t>(l);
  const V iota = V::load(lane);

  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    v2d::BAPixel<V> px;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t k = chunk_kf[c];
      const int64_t b = c - (std::lower_bound(chunk_kf.begin(), chunk_kf.end(), k) - chunk_kf.begin());
      const std::vector<int64_t>& edges = edges_of[static_cast<size_t>(k)];
      const int m = static_cast<int>(edges.size());
      std::vector<v2d::GNCamera<V>> cams(m);
      for (int l = 0; l < m; ++l) v2d::gn_camera(rel_ptr + edges[l] * 12, intr_ptr, md, cams[l]);
      std::vector<V> acc(static_cast<size_t>(m) * kSlot, V(scalar_t(0)));
      const int64_t p0 = b * kPixelsPerChunk, p1 = std::min(p0 + kPixelsPerChunk, P);
      for (int64_t q0 = p0; q0 < p1; q0 += kPixelsPerFlush) {
        const int64_t q1 = std::min(q0 + kPixelsPerFlush, p1);
        for (int64_t p = q0; p < q1; p += N) {
          const int n = static_cast<int>(std::min<int64_t>(N, q1 - p));
          const int64_t col = p % w, row = p / w;
          V u, v, rho;
          scalar_t buf[3][N] = {};
          if (n == N && col + N <= w) {
            u = (V(static_cast<scalar_t>(col)) + iota) * V(s);
            v = V(static_cast<scalar_t>(row) * s);
            rho = V::load(d_ptr + k * P + p);
          } else {  // a row boundary or the end of the chunk: lanes past n are padding (rho = 0)
            for (int l = 0; l < n; ++l) {
              buf[0][l] = static_cast<scalar_t>((p + l) % w) * s;
              buf[1][l] = static_cast<scalar_t>((p + l) / w) * s;
              buf[2][l] = d_ptr[k * P + p + l];
            }
            u = V::load(buf[0]);
            v = V::load(buf[1]);
            rho = V::load(buf[2]);
          }
          V own[6], hpp(scalar_t(0)), gp(scalar_t(0));
          for (int i = 0; i < 6; ++i) own[i] = V(scalar_t(0));
          for (int l = 0; l < m; ++l) {
            const int64_t e = edges[l];
            V tu, tv, w0;
            if (n == N) {
              gn_simd::load_pairs(tgt_ptr + 2 * (e * P + p), tu, tv);
              w0 = V::load(w_ptr + e * P + p);
            } else {
              scalar_t t[3][N] = {};
              for (int q = 0; q < n; ++q) {
                t[0][q] = tgt_ptr[2 * (e * P + p + q)];
                t[1][q] = tgt_ptr[2 * (e * P + p + q) + 1];
                t[2][q] = w_ptr[e * P + p + q];
              }
              tu = V::load(t[0]);
              tv = V::load(t[1]);
              w0 = V::load(t[2]);
            }
            v2d::ba_linearize<V>(u, v, rho, tu, tv, w0, inv_c2, cams[l], px);
            V* a = acc.data() + static_cast<size_t>(l) * kSlot;
            v2d::gn_accumulate<V, 6, V>(px.gn, a, a + 36);
            store_rows(px.c, 6, c_ptr, e * P + p, n);
            v2d::ba_add_own(px.c, adj_ptr + e * 36, own);
            hpp += px.hpp;
            gp += px.gp;
          }
          store_rows(own, 6, own_ptr, k * P + p, n);
          store_rows(&hpp, 1, hpp_ptr, k * P + p, n);
          store_rows(&gp, 1, gp_ptr, k * P + p, n);
        }
        for (int l = 0; l < m; ++l)
          flush(acc.data() + static_cast<size_t>(l) * kSlot, kSlot, partial.data() + (b * E + edges[l]) * kSlot);
      }
    }
  });

  auto H_acc = out[0].accessor<scalar_t, 3>();
  auto g_acc = out[1].accessor<scalar_t, 2>();
  for (int64_t e = 0; e < E; ++e) {
    double sum[kSlot] = {0};
    for (int64_t b = 0; b < blocks; ++b)
      for (int q = 0; q < kSlot; ++q) sum[q] += partial[(b * E + e) * kSlot + q];
    for (int i = 0; i < 6; ++i) {
      for (int j = i; j < 6; ++j) {
        H_acc[e][i][j] = static_cast<scalar_t>(sum[i * 6 + j]);
        H_acc[e][j][i] = static_cast<scalar_t>(sum[i * 6 + j]);
      }
      g_acc[e][i] = static_cast<scalar_t>(sum[36 + i]);
    }
  }
}

}  // namespace

std::vector<torch::Tensor> ba_reduce_cpu(const torch::Tensor& inv_depth, const torch::Tensor& ii,
                                         const torch::Tensor& rel_poses, const torch::Tensor& adjoints,
                                         const torch::Tensor& intrinsics, const torch::Tensor& targets,
                                         const torch::Tensor& weights, int64_t stride, double min_depth,
                                         double robust_scale) {
  const int64_t Kf = inv_depth.size(0), h = inv_depth.size(1), w = inv_depth.size(2), E = ii.size(0);
  const auto opt = inv_depth.options();
  // Keyframes without edges keep zero couplings and sums; every edge's c is written.
  std::vector<torch::Tensor> out = {torch::zeros({E, 6, 6}, opt), torch::zeros({E, 6}, opt),
                                    torch::empty({E, h, w, 6}, opt), torch::zeros({Kf, h, w, 6}, opt),
                                    torch::zeros({Kf, h, w}, opt), torch::zeros({Kf, h, w}, opt)};
  AT_DISPATCH_FLOATING_TYPES(inv_depth.scalar_type(), "ba_reduce_cpu", [&] {
    forward_impl<scalar_t>(inv_depth, ii, rel_poses, adjoints, intrinsics, targets, weights, stride, min_depth,
                           robust_scale, out);
  });
  return out;
}
