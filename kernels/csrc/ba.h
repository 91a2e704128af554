// Per-pixel math of the window bundle-adjustment kernel (ba_reduce), shared by ba_cpu.cpp and
// ba_cuda.cu. It builds on gn.h: the target pose's Jacobian, the residual and the validity are
// exactly gn_linearize's; this header adds the inverse-depth column, the robust weight and the
// terms the Schur complement over the pixels needs.
//
// Conventions (kernels/ops.py `ba_reduce` documents them for users):
//  - a keyframe pixel (u, v) with inverse depth rho is seen in camera j at pi(X), with
//    X = R x + rho t the homogeneous point (x = K^-1 [u, v, 1]); X = rho P for gn.h's point
//    P = R x / rho + t, so pi, d pi / d xi_j and the validity (rho > 0, P_z > min_depth) are gn.h's;
//  - d pi / d rho = (d pi / dX) t = (1 / X_z) [fx (t_x - x t_z), fy (t_y - y t_z)] with
//    x = X_x / X_z, y = X_y / X_z and 1 / X_z = a / rho = a X[2] in gn.h's names;
//  - r = target - pi; the robust weight is w = w0 / (1 + |r|^2 / c^2) (Cauchy IRLS; c = 0: w = w0),
//    0 on invalid pixels;
//  - per edge: H_jj += w J^T J, g_j += w J^T r (gn_accumulate with both weights w);
//    per pixel and edge: c = w J^T J_rho (the pixel's coupling to the target pose);
//    per pixel, summed over its keyframe's edges: h_pp += w |J_rho|^2, g_p += w J_rho . r and
//    c_own -= Adj^T c (the coupling to the keyframe's own pose: d pi / d xi_i = -J Adj).
#pragma once

#include "gn.h"

namespace v2d {

template <typename T>
struct BAPixel {
  GNPixel<T, 6> gn;  // J (target pose), r, a, x, y, X; gn.w[0] == gn.w[1] == the robust weight
  T Jr[2];           // d pi / d rho (0 on invalid pixels)
  T c[6];            // w J^T J_rho
  T hpp, gp;         // w |J_rho|^2, w J_rho . r
};

// Linearise one pixel (or one vector of pixels) of one edge. inv_c2 = 1 / c^2, or 0 for plain
// least squares. Returns the validity (bool, or a lane mask); an invalid pixel gets all-zero terms.
template <typename T>
V2D_HOST_DEVICE auto ba_linearize(T u, T v, T rho, T tu, T tv, T w0, T inv_c2, const GNCamera<T>& cam,
                                  BAPixel<T>& px) {
  const auto valid = gn_linearize<T, 6>(u, v, rho, tu, tv, w0, w0, cam, px.gn);
  const T ru = px.gn.r[0], rv = px.gn.r[1];
  // px.gn.w is 0 on invalid pixels, whose residual is finite (x = y = 0), so w is 0 there too.
  const T w = px.gn.w[0] / (T(1) + (ru * ru + rv * rv) * inv_c2);
  px.gn.w[0] = w;
  px.gn.w[1] = w;
  const T iz = px.gn.a * px.gn.X[2];  // 1 / X_z (0 on invalid pixels)
  const T* R = cam.rel;
  px.Jr[0] = cam.fx * iz * (R[3] - px.gn.x * R[11]);
  px.Jr[1] = cam.fy * iz * (R[7] - px.gn.y * R[11]);
  const T wu = w * px.Jr[0], wv = w * px.Jr[1];
  V2D_UNROLL
  for (int i = 0; i < 6; ++i) {
    if (gn_ju_nonzero(i) && gn_jv_nonzero(i))
      px.c[i] = px.gn.Ju[i] * wu + px.gn.Jv[i] * wv;
    else if (gn_ju_nonzero(i))
      px.c[i] = px.gn.Ju[i] * wu;
    else
      px.c[i] = px.gn.Jv[i] * wv;
  }
  px.hpp = wu * px.Jr[0] + wv * px.Jr[1];
  px.gp = wu * ru + wv * rv;
  return valid;
}

// c_own -= Adj^T c for the edge's adjoint Adj (6x6, row-major).
template <typename T, typename S>
V2D_HOST_DEVICE void ba_add_own(const T* c, const S* adj, T* c_own) {
  V2D_UNROLL
  for (int b = 0; b < 6; ++b) {
    T s = c[0] * T(adj[b]);
    V2D_UNROLL
    for (int a = 1; a < 6; ++a) s = s + c[a] * T(adj[a * 6 + b]);
    c_own[b] = c_own[b] - s;
  }
}

}  // namespace v2d
