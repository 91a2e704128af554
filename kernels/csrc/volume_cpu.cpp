// CPU (at::parallel_for) implementation of backproject_volume; per-sample math in volume.h.
// Forward: each (m, d, y, x) is projected once and all channels are sampled from it.
// Backward: see backward_impl (projection once per (depth, pixel) and chunk of channels).
#include <ATen/Parallel.h>

#include "ops.h"
#include "volume.h"

namespace {

template <typename scalar_t>
void forward_impl(const torch::Tensor& features, const torch::Tensor& rel_poses, const torch::Tensor& intrinsics,
                  const torch::Tensor& depths, torch::Tensor& out) {
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t D = depths.size(0), hw = h * w;
  const scalar_t* f = features.data_ptr<scalar_t>();
  const scalar_t* rel = rel_poses.data_ptr<scalar_t>();
  const scalar_t* intr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* z = depths.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, M * D, 1, [&](int64_t begin, int64_t end) {
    v2d::VolumeSample<scalar_t> s;
    for (int64_t md = begin; md < end; ++md) {
      const int64_t m = md / D, d = md % D;
      for (int64_t p = 0; p < hw; ++p) {
        const bool ok = v2d::volume_project<scalar_t>(static_cast<scalar_t>(p % w), static_cast<scalar_t>(p / w), z[d],
                                                      rel + 12 * m, intr + 4 * m, s);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t oi = (((m * C + c) * D + d) * hw) + p;
          o[oi] = ok ? v2d::volume_sample<scalar_t>(f + (m * C + c) * hw, h, w, s) : scalar_t(0);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const torch::Tensor& grad, const torch::Tensor& features, const torch::Tensor& rel_poses,
                   const torch::Tensor& intrinsics, const torch::Tensor& depths, torch::Tensor& g_feat,
                   torch::Tensor& g_rel, bool need_feat, bool need_pose) {
  const int64_t M = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t D = depths.size(0), hw = h * w;
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* f = features.data_ptr<scalar_t>();
  const scalar_t* rel = rel_poses.data_ptr<scalar_t>();
  const scalar_t* intr = intrinsics.data_ptr<scalar_t>();
  const scalar_t* z = depths.data_ptr<scalar_t>();
  const int W = static_cast<int>(w), Hh = static_cast<int>(h);

  // One chunk = neighbour m x a block of channels: each (depth, pixel) is projected once per chunk
  // and its gradient scattered into the chunk's own feature planes, so no two threads write the
  // same element; pose gradients go to per-chunk double partials summed in a fixed order.
  const int64_t nb = std::min<int64_t>(C, 4), cb = (C + nb - 1) / nb;
  scalar_t* gf = g_feat.data_ptr<scalar_t>();
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(M * nb, 1)) * 12, 0.0);
  at::parallel_for(0, M * nb, 1, [&](int64_t begin, int64_t end) {
    v2d::VolumeSample<scalar_t> s;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t m = chunk / nb, c0 = (chunk % nb) * cb, c1 = std::min(C, c0 + cb);
      double* acc = partial.data() + chunk * 12;
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t p = 0; p < hw; ++p) {
          if (!v2d::volume_project<scalar_t>(static_cast<scalar_t>(p % w), static_cast<scalar_t>(p / w), z[d],
                                             rel + 12 * m, intr + 4 * m, s))
            continue;
          const scalar_t wts[4] = {(1 - s.wx) * (1 - s.wy), s.wx * (1 - s.wy), (1 - s.wx) * s.wy, s.wx * s.wy};
          const int xs[4] = {s.x0, s.x0 + 1, s.x0, s.x0 + 1}, ys[4] = {s.y0, s.y0, s.y0 + 1, s.y0 + 1};
          double gu = 0, gv = 0;
          for (int64_t c = c0; c < c1; ++c) {
            const scalar_t go = g[((m * C + c) * D + d) * hw + p];
            if (go == scalar_t(0)) continue;
            if (need_feat) {
              scalar_t* plane = gf + (m * C + c) * hw;
              for (int k = 0; k < 4; ++k)
                if (xs[k] >= 0 && xs[k] < W && ys[k] >= 0 && ys[k] < Hh) plane[ys[k] * W + xs[k]] += wts[k] * go;
            }
            if (need_pose) {
              scalar_t du, dv;
              v2d::volume_sample_grad_uv<scalar_t>(f + (m * C + c) * hw, Hh, W, s, du, dv);
              gu += double(go) * du;
              gv += double(go) * dv;
            }
          }
          if (need_pose) v2d::volume_pose_grad<scalar_t, double>(s, intr + 4 * m, gu, gv, acc);
        }
      }
    }
  });
  if (need_pose) {
    auto acc = g_rel.accessor<scalar_t, 3>();
    for (int64_t m = 0; m < M; ++m) {
      double sum[12] = {0};
      for (int64_t b = 0; b < nb; ++b)
        for (int k = 0; k < 12; ++k) sum[k] += partial[(m * nb + b) * 12 + k];
      for (int k = 0; k < 12; ++k) acc[m][k / 4][k % 4] = static_cast<scalar_t>(sum[k]);
    }
  }
}

}  // namespace

torch::Tensor backproject_volume_forward_cpu(const torch::Tensor& features, const torch::Tensor& rel_poses,
                                             const torch::Tensor& intrinsics, const torch::Tensor& depths) {
  auto out = torch::empty({features.size(0), features.size(1), depths.size(0), features.size(2), features.size(3)},
                          features.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_forward_cpu",
                             [&] { forward_impl<scalar_t>(features, rel_poses, intrinsics, depths, out); });
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
              "backproject_volume_backward: grad_volume must be (M, C, D, h, w)");
  auto g_feat = torch::zeros_like(features);
  auto g_rel = torch::zeros_like(rel_poses);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "backproject_volume_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_volume, features, rel_poses, intrinsics, depths, g_feat, g_rel, true, true);
  });
  return {g_feat, g_rel};
}
