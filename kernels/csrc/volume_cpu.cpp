// CPU (at::parallel_for) implementation of backproject_volume; per-sample math in volume.h.
//
// Both passes walk the volume one keyframe row at a time: the row's w samples are projected once
// (volume_project + volume_taps), then all channels are processed through that projection. The
// features (and their gradient) are handled channel-last, (M, h*w, C), so that the four taps of a
// sample are four contiguous channel vectors and the channel loops vectorise; a w x C tile per row
// converts to and from the volume's (M, C, D, h, w) layout.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "volume.h"

namespace {

// Backward work items are (neighbour, block of channels, block of depths). Each item re-projects
// its samples, so channel blocks are large; depth blocks exist to give small M enough items to
// share among threads, at the price of a private feature-gradient buffer per extra depth block.
// The split depends on the shapes only, never on the thread count, so every sum (and the result)
// is reproducible.
constexpr int64_t kBackwardChannelBlock = 32;
constexpr int64_t kBackwardMinItems = 8;

// One keyframe row at one depth for one neighbour, projected; `valid` lists the samples with at
// least one tap inside the image (the others are zero and have zero gradient).
template <typename T>
struct RowBuffer {
  std::vector<v2d::VolumeSample<T>> s;
  std::vector<v2d::VolumeTaps<T>> taps;
  std::vector<int> valid;

  explicit RowBuffer(int64_t w) : s(w), taps(w) { valid.reserve(w); }

  void fill(int64_t y, T z, const T* rel, const T* intr, int h, int w) {
    valid.clear();
    for (int x = 0; x < w; ++x)
      if (v2d::volume_project<T>(static_cast<T>(x), static_cast<T>(y), z, rel, intr, s[x]) &&
          v2d::volume_taps<T>(s[x], h, w, taps[x]))
        valid.push_back(x);
  }
};

template <typename scalar_t>
void forward_impl(const torch::Tensor& features_cl, const torch::Tensor& rel_poses, const torch::Tensor& intrinsics,
                  const torch::Tensor& depths, torch::Tensor& out) {
  const int64_t M = out.size(0), C = out.size(1), D = out.size(2), h = out.size(3), w = out.size(4), hw = h * w;
  const scalar_t* f = features_cl.data_ptr<scalar_t>();
  const scalar_t* rel = rel_poses.data_ptr<scalar_t>();
  const scalar_t* intr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* z = depths.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, M * D, 1, [&](int64_t begin, int64_t end) {
    RowBuffer<scalar_t> row(w);
    // The row's result as tile[c * w + x]: channel vectors are computed per sample and stored with a
    // stride into this L1-sized tile, so that the volume itself is written in contiguous rows.
    std::vector<scalar_t> tile(C * w);
    for (int64_t md = begin; md < end; ++md) {
      const int64_t m = md / D, d = md % D;
      const scalar_t* fm = f + m * hw * C;
      for (int64_t y = 0; y < h; ++y) {
        row.fill(y, z[d], rel + 12 * m, intr + 4 * m, static_cast<int>(h), static_cast<int>(w));
        if (static_cast<int64_t>(row.valid.size()) < w) std::fill(tile.begin(), tile.end(), scalar_t(0));
        for (const int x : row.valid) {
          const v2d::VolumeTaps<scalar_t>& t = row.taps[x];
          scalar_t* a = tile.data() + x;
          if (t.all_in) {
            const scalar_t *f0 = fm + t.off[0] * C, *f1 = fm + t.off[1] * C, *f2 = fm + t.off[2] * C,
                           *f3 = fm + t.off[3] * C;
            const scalar_t w0 = t.wt[0], w1 = t.wt[1], w2 = t.wt[2], w3 = t.wt[3];
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c * w] = w0 * f0[c] + w1 * f1[c] + w2 * f2[c] + w3 * f3[c];
          } else {
            for (int64_t c = 0; c < C; ++c) a[c * w] = 0;
            for (int k = 0; k < 4; ++k) {
              if (!t.in[k]) continue;
              const scalar_t* fk = fm + t.off[k] * C;
              const scalar_t wk = t.wt[k];
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) a[c * w] += wk * fk[c];
            }
          }
        }
        for (int64_t c = 0; c < C; ++c)
          std::copy_n(tile.data() + c * w, w, o + ((m * C + c) * D + d) * hw + y * w);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const torch::Tensor& grad, const torch::Tensor& features_cl, const torch::Tensor& rel_poses,
                   const torch::Tensor& intrinsics, const torch::Tensor& depths, torch::Tensor& g_feat_cl,
                   torch::Tensor& g_rel) {
  const int64_t M = grad.size(0), C = grad.size(1), D = grad.size(2), h = grad.size(3), w = grad.size(4);
  const int64_t hw = h * w;
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* f = features_cl.data_ptr<scalar_t>();
  const scalar_t* rel = rel_poses.data_ptr<scalar_t>();
  const scalar_t* intr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* z = depths.data_ptr<scalar_t>();
  scalar_t* gf = g_feat_cl.data_ptr<scalar_t>();

  // Item (m, b, kd): channels [c0, c0 + n) of neighbour m, depths of block kd. Items of depth block 0
  // write the feature gradient directly, those of block kd > 0 into extra[kd - 1]; within a block no
  // two items share an element (no atomics). Pose gradients go to per-item double partials. Both
  // are summed in a fixed order afterwards.
  const int64_t nb = std::max<int64_t>((C + kBackwardChannelBlock - 1) / kBackwardChannelBlock, 1);
  const int64_t cb = (C + nb - 1) / nb;
  const int64_t nd = std::clamp<int64_t>((kBackwardMinItems + M * nb - 1) / (M * nb), 1, D);
  const int64_t db = (D + nd - 1) / nd;
  std::vector<scalar_t> extra(static_cast<size_t>((nd - 1) * M * hw * C), scalar_t(0));
  std::vector<double> partial(static_cast<size_t>(M * nb * nd) * 12, 0.0);
  at::parallel_for(0, M * nb * nd, 1, [&](int64_t begin, int64_t end) {
    RowBuffer<scalar_t> row(w);
    std::vector<scalar_t> tile(w * cb);  // incoming gradient of one row, tile[x * n + j], channel c0 + j
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / (nb * nd), b = item / nd % nb, kd = item % nd;
      const int64_t c0 = b * cb, n = std::min(C, c0 + cb) - c0;
      const scalar_t* fm = f + m * hw * C + c0;
      scalar_t* gfm = (kd == 0 ? gf : extra.data() + (kd - 1) * M * hw * C) + m * hw * C + c0;
      double* acc = partial.data() + item * 12;
      for (int64_t d = kd * db; d < std::min(D, (kd + 1) * db); ++d) {
        for (int64_t y = 0; y < h; ++y) {
          row.fill(y, z[d], rel + 12 * m, intr + 4 * m, static_cast<int>(h), static_cast<int>(w));
          if (row.valid.empty()) continue;
          // The incoming gradient is the one large array read here, n rows at a time from n planes;
          // prefetching each plane's next row keeps those streams ahead of the hardware prefetcher.
          constexpr int64_t kLine = 64 / sizeof(scalar_t);
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* grow = g + ((m * C + c0 + j) * D + d) * hw + y * w;
            for (const int x : row.valid) tile[x * n + j] = grow[x];
            for (int64_t q = w; q < 2 * w; q += kLine) __builtin_prefetch(grow + q);
          }
          for (const int x : row.valid) {
            const v2d::VolumeTaps<scalar_t>& t = row.taps[x];
            const scalar_t* go = tile.data() + x * n;
            scalar_t du, dv;
            if (t.all_in) {
              const scalar_t *f0 = fm + t.off[0] * C, *f1 = fm + t.off[1] * C, *f2 = fm + t.off[2] * C,
                             *f3 = fm + t.off[3] * C;
              scalar_t *g0 = gfm + t.off[0] * C, *g1 = gfm + t.off[1] * C, *g2 = gfm + t.off[2] * C,
                       *g3 = gfm + t.off[3] * C;
              const scalar_t w0 = t.wt[0], w1 = t.wt[1], w2 = t.wt[2], w3 = t.wt[3];
              const scalar_t ax = 1 - t.wx, bx = t.wx, ay = 1 - t.wy, by = t.wy;
              scalar_t su = 0, sv = 0;
#pragma omp simd reduction(+ : su, sv)
              for (int64_t j = 0; j < n; ++j) {
                const scalar_t gj = go[j];
                su += gj * (ay * (f1[j] - f0[j]) + by * (f3[j] - f2[j]));
                sv += gj * (ax * (f2[j] - f0[j]) + bx * (f3[j] - f1[j]));
                g0[j] += w0 * gj;
                g1[j] += w1 * gj;
                g2[j] += w2 * gj;
                g3[j] += w3 * gj;
              }
              du = su;
              dv = sv;
            } else {
              // dots[k] = sum_c go[c] tap_k[c]: d L / d(u', v') is linear in the tap values, so the
              // channel sum can be taken first.
              scalar_t dots[4] = {0, 0, 0, 0};
              for (int k = 0; k < 4; ++k) {
                if (!t.in[k]) continue;
                const scalar_t* fk = fm + t.off[k] * C;
                scalar_t* gk = gfm + t.off[k] * C;
                const scalar_t wk = t.wt[k];
                scalar_t s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t j = 0; j < n; ++j) {
                  s += go[j] * fk[j];
                  gk[j] += wk * go[j];
                }
                dots[k] = s;
              }
              v2d::volume_interp_grad_uv(t, dots, du, dv);
            }
            v2d::volume_pose_grad<scalar_t, double>(row.s[x], intr + 4 * m, du, dv, acc);
          }
        }
      }
    }
  });
  if (nd > 1) {
    const int64_t size = M * hw * C;
    at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = 1; k < nd; ++k) {
        const scalar_t* e = extra.data() + (k - 1) * size;
        for (int64_t i = begin; i < end; ++i) gf[i] += e[i];
      }
    });
  }
  auto out = g_rel.accessor<scalar_t, 3>();
  for (int64_t m = 0; m < M; ++m) {
    double sum[12] = {0};
    for (int64_t i = m * nb * nd; i < (m + 1) * nb * nd; ++i)
      for (int q = 0; q < 12; ++q) sum[q] += partial[i * 12 + q];
    for (int q = 0; q < 12; ++q) out[m][q / 4][q % 4] = static_cast<scalar_t>(sum[q]);
  }
}

// (M, C, h, w) -> contiguous (M, h*w, C); a copy of the (small) feature map, not of the volume.
torch::Tensor channels_last(const torch::Tensor& features) {
  return features.flatten(2).transpose(1, 2).contiguous();
}

}  // namespace

torch::Tensor backproject_volume_forward_cpu(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                             const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  auto out = torch::empty({features.size(0), features.size(1), depths.size(0), features.size(2), features.size(3)},
                          features.options());
  if (out.numel() == 0) return out;
  const auto features_cl = channels_last(features);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_forward_cpu",
                             [&] { forward_impl<scalar_t>(features_cl, rel_poses, intrinsics, depths, out); });
  return out;
}

std::vector<torch::Tensor> backproject_volume_backward_cpu(const torch::Tensor& grad_volume,
                                                           const torch::Tensor& features,
                                                           const torch::Tensor& rel_poses,
                                                           const torch::Tensor& intrinsics,
                                                           const torch::Tensor& depths) {
  TORCH_CHECK(grad_volume.dim() == 5 && grad_volume.size(0) == features.size(0) &&
                  grad_volume.size(1) == features.size(1) && grad_volume.size(2) == depths.size(0) &&
                  grad_volume.size(3) == features.size(2) && grad_volume.size(4) == features.size(3),
              "backproject_volume_backward: grad_volume must be (M, C, D, h, w) = (", features.size(0), ", ",
              features.size(1), ", ", depths.size(0), ", ", features.size(2), ", ", features.size(3), "), got ",
              grad_volume.sizes());
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  auto g_feat_cl = torch::zeros({M, h * w, C}, features.options());
  auto g_rel = torch::zeros_like(rel_poses);
  if (grad_volume.numel() > 0) {
    const auto features_cl = channels_last(features);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_backward_cpu", [&] {
      backward_impl<scalar_t>(grad_volume, features_cl, rel_poses, intrinsics, depths, g_feat_cl, g_rel);
    });
  }
  return {g_feat_cl.transpose(1, 2).reshape({M, C, h, w}).contiguous(), g_rel};
}
