// Per-pixel math of the Gauss-Newton kernel (gn_reduce), shared by gn_cpu.cpp and gn_cuda.cu.
//
// Conventions (kernels/ops.py documents them for users):
//  - keyframe pixel (u, v) with inverse depth d back-projects to X = [(u-cx)/fx, (v-cy)/fy, 1] / d;
//  - P = R X + t in the target camera, rel = [R | t] row-major (12 values);
//  - residual r = target - pi(P), pi(P) = (fx P_x/P_z + cx, fy P_y/P_z + cy);
//  - J = d pi / d xi for a left perturbation exp(xi) of the target camera's world->camera pose,
//    xi = [translation (3), rotation (3)], and optionally a 7th column d pi / d s for the focal
//    log-scale s (fx, fy <- fx e^s, fy e^s in both back-projection and projection);
//  - H += J^T W J, b += J^T W r with W = diag(weights) on valid pixels (d > 0, P_z > min_depth).
// Writing J in terms of a = 1/P_z, x = P_x a, y = P_y a keeps both the forward and its
// derivative short enough to write by hand, so no per-pixel Jacobian is ever stored.
//
// The functions are branch-free and templated on the value type T: the CUDA kernels use the scalar
// (one pixel per thread), the CPU kernels a SIMD vector of pixels (gn_cpu.cpp), which overloads the
// three helpers gn_gt, gn_and and gn_select for it. An invalid pixel is not skipped: its
// intermediates (X, a, x, y, weights, hence J) are set to exactly 0 so that it adds exactly 0.
#pragma once

#include "common.h"

namespace v2d {

// Comparison, conjunction and selection for scalar T (gn_cpu.cpp overloads them for its vectors).
template <typename T>
V2D_HOST_DEVICE bool gn_gt(T a, T b) {
  return a > b;
}
V2D_HOST_DEVICE bool gn_and(bool a, bool b) { return a && b; }
template <typename T>
V2D_HOST_DEVICE T gn_select(bool c, T a, T b) {
  return c ? a : b;
}

// Structural zeros of J: J_u does not depend on the y translation (column 1), J_v not on x (0).
V2D_HOST_DEVICE constexpr bool gn_ju_nonzero(int i) { return i != 1; }
V2D_HOST_DEVICE constexpr bool gn_jv_nonzero(int i) { return i != 0; }

// Per-edge constants, converted once to T (a broadcast vector on the CPU).
template <typename T>
struct GNCamera {
  T rel[12];
  T fx, fy, cx, cy;
  T ifx, ify;  // 1 / fx, 1 / fy
  T min_depth;
};

template <typename S, typename T>
V2D_HOST_DEVICE void gn_camera(const S* rel, const S* intr, S min_depth, GNCamera<T>& cam) {
  for (int i = 0; i < 12; ++i) cam.rel[i] = T(rel[i]);
  cam.fx = T(intr[0]);
  cam.fy = T(intr[1]);
  cam.cx = T(intr[2]);
  cam.cy = T(intr[3]);
  cam.ifx = T(S(1) / intr[0]);
  cam.ify = T(S(1) / intr[1]);
  cam.min_depth = T(min_depth);
}

template <typename T, int K>
struct GNPixel {
  T Ju[K];  // Ju[1] == 0 and Jv[0] == 0 (gn_ju_nonzero / gn_jv_nonzero); readers skip them
  T Jv[K];
  T r[2];
  T w[2];  // 0 on invalid pixels
  // Intermediates the backward pass needs (all 0 on invalid pixels).
  T X[3];  // back-projected point in the source camera; X[2] = 1/d
  T q[3];  // R [X_x, X_y, 0] (focal column only)
  T a, x, y;
};

// Linearise one pixel (or one vector of pixels) at (u, v) with inverse depth d, target (tu, tv) and
// weights (wu, wv). Returns the validity (bool, or a lane mask); invalid pixels get J = 0, w = 0.
template <typename T, int K>
V2D_HOST_DEVICE auto gn_linearize(T u, T v, T d, T tu, T tv, T wu, T wv, const GNCamera<T>& cam,
                                  GNPixel<T, K>& px) {
  const T zero(0);
  // A non-positive d gives inf / NaN below; every such value is replaced by 0 through `valid`.
  const T id = T(1) / d;
  const T X0 = (u - cam.cx) * cam.ifx * id, X1 = (v - cam.cy) * cam.ify * id, X2 = id;
  const T* R = cam.rel;
  const T P0 = R[0] * X0 + R[1] * X1 + R[2] * X2 + R[3];
  const T P1 = R[4] * X0 + R[5] * X1 + R[6] * X2 + R[7];
  const T P2 = R[8] * X0 + R[9] * X1 + R[10] * X2 + R[11];
  const auto valid = gn_and(gn_gt(d, zero), gn_gt(P2, cam.min_depth));
  const T a_raw = T(1) / P2;
  const T a = gn_select(valid, a_raw, zero), x = gn_select(valid, P0 * a_raw, zero),
          y = gn_select(valid, P1 * a_raw, zero);
  const T one = gn_select(valid, T(1), zero);
  px.X[0] = gn_select(valid, X0, zero);
  px.X[1] = gn_select(valid, X1, zero);
  px.X[2] = gn_select(valid, X2, zero);
  px.a = a;
  px.x = x;
  px.y = y;
  const T fx = cam.fx, fy = cam.fy;
  px.Ju[0] = fx * a;
  px.Ju[1] = zero;
  px.Ju[2] = -fx * x * a;
  px.Ju[3] = -fx * x * y;
  px.Ju[4] = fx * (one + x * x);
  px.Ju[5] = -fx * y;
  px.Jv[0] = zero;
  px.Jv[1] = fy * a;
  px.Jv[2] = -fy * y * a;
  px.Jv[3] = -fy * (one + y * y);
  px.Jv[4] = fy * x * y;
  px.Jv[5] = fy * x;
  if constexpr (K == 7) {
    for (int i = 0; i < 3; ++i) px.q[i] = R[4 * i] * px.X[0] + R[4 * i + 1] * px.X[1];
    px.Ju[6] = fx * (x - a * (px.q[0] - x * px.q[2]));
    px.Jv[6] = fy * (y - a * (px.q[1] - y * px.q[2]));
  }
  px.r[0] = tu - (fx * x + cam.cx);
  px.r[1] = tv - (fy * y + cam.cy);
  px.w[0] = gn_select(valid, wu, zero);
  px.w[1] = gn_select(valid, wv, zero);
  return valid;
}

// H (K*K, only the upper triangle i <= j is written) and b (K) accumulate in type A.
template <typename T, int K, typename A>
V2D_HOST_DEVICE void gn_accumulate(const GNPixel<T, K>& px, A* H, A* b) {
  const A wu = A(px.w[0]), wv = A(px.w[1]);
  const A ru = wu * A(px.r[0]), rv = wv * A(px.r[1]);
  V2D_UNROLL
  for (int i = 0; i < K; ++i) {
    const A ui = wu * A(px.Ju[i]), vi = wv * A(px.Jv[i]);
    V2D_UNROLL
    for (int j = i; j < K; ++j) {
      const bool use_u = gn_ju_nonzero(i) && gn_ju_nonzero(j), use_v = gn_jv_nonzero(i) && gn_jv_nonzero(j);
      if (use_u && use_v)
        H[i * K + j] += ui * A(px.Ju[j]) + vi * A(px.Jv[j]);
      else if (use_u)
        H[i * K + j] += ui * A(px.Ju[j]);
      else if (use_v)
        H[i * K + j] += vi * A(px.Jv[j]);
    }
    if (gn_ju_nonzero(i) && gn_jv_nonzero(i))
      b[i] += A(px.Ju[i]) * ru + A(px.Jv[i]) * rv;
    else if (gn_ju_nonzero(i))
      b[i] += A(px.Ju[i]) * ru;
    else
      b[i] += A(px.Jv[i]) * rv;
  }
}

// Number of per-edge values the backward reduces: dL/drel (12) then dL/d(fx, fy, cx, cy) (4).
constexpr int kGNEdgeGrads = 16;

// Backward of one pixel (or vector of pixels) given Gs = G + G^T for G = dL/dH (K*K, full; callers
// form it once per edge) and g = dL/db (K). Writes dL/dd, dL/dtarget (2), dL/dweight (2) and adds
// dL/drel (12) then dL/dintrinsics (4) into g_edge (kGNEdgeGrads values). An invalid pixel
// (zeroed by gn_linearize) gets zero gradients and adds zero.
template <typename T, int K, typename A>
V2D_HOST_DEVICE void gn_pixel_backward(const GNPixel<T, K>& px, const GNCamera<T>& cam, const T* Gs, const T* g,
                                       T& g_d, T* g_target, T* g_weight, A* g_edge) {
  A* g_rel = g_edge;
  const A fx = A(cam.fx), fy = A(cam.fy), ifx = A(cam.ifx), ify = A(cam.ify);
  const A wu = A(px.w[0]), wv = A(px.w[1]), ru = A(px.r[0]), rv = A(px.r[1]);
  const A a = A(px.a), x = A(px.x), y = A(px.y);

  // dL/dJ rows: w (G + G^T) J + w r g;  dL/dr = w J.g;  dL/dw = J^T G J + r J.g
  A gu[K], gv[K];
  A Jg_u(0), Jg_v(0), JGJ_u(0), JGJ_v(0);
  V2D_UNROLL
  for (int i = 0; i < K; ++i) {
    A su(0), sv(0);
    V2D_UNROLL
    for (int j = 0; j < K; ++j) {
      const A s = A(Gs[i * K + j]);
      if (gn_ju_nonzero(j)) su += s * A(px.Ju[j]);
      if (gn_jv_nonzero(j)) sv += s * A(px.Jv[j]);
    }
    const A gi = A(g[i]);
    gu[i] = wu * (su + ru * gi);
    gv[i] = wv * (sv + rv * gi);
    if (gn_ju_nonzero(i)) {
      Jg_u += A(px.Ju[i]) * gi;
      JGJ_u += A(px.Ju[i]) * su;  // su = Gs J, so J.su = 2 J^T G J
    }
    if (gn_jv_nonzero(i)) {
      Jg_v += A(px.Jv[i]) * gi;
      JGJ_v += A(px.Jv[i]) * sv;
    }
  }
  const A dru = wu * Jg_u, drv = wv * Jg_v;
  g_target[0] = T(dru);
  g_target[1] = T(drv);
  g_weight[0] = T(A(0.5) * JGJ_u + ru * Jg_u);
  g_weight[1] = T(A(0.5) * JGJ_v + rv * Jg_v);

  // Through J(a, x, y[, q]) and r(x, y) to a, x, y (see the forward for the formulas).
  A ga = fx * (gu[0] - x * gu[2]) + fy * (gv[1] - y * gv[2]);
  A gx = fx * (-a * gu[2] - y * gu[3] + A(2) * x * gu[4]) + fy * (y * gv[4] + gv[5]) - fx * dru;
  A gy = fx * (-x * gu[3] - gu[5]) + fy * (-a * gv[2] - A(2) * y * gv[3] + x * gv[4]) - fy * drv;
  A gq[3] = {A(0), A(0), A(0)};
  if constexpr (K == 7) {
    const A q0 = A(px.q[0]), q1 = A(px.q[1]), q2 = A(px.q[2]);
    ga += fx * gu[6] * (x * q2 - q0) + fy * gv[6] * (y * q2 - q1);
    gx += fx * gu[6] * (A(1) + a * q2);
    gy += fy * gv[6] * (A(1) + a * q2);
    gq[0] = -fx * gu[6] * a;
    gq[1] = -fy * gv[6] * a;
    gq[2] = a * (fx * gu[6] * x + fy * gv[6] * y);
  }

  // a = 1/P_z, x = P_x a, y = P_y a.
  const A gP[3] = {a * gx, a * gy, -a * (x * gx + y * gy + a * ga)};

  // P = R X + t and q = R [X_x, X_y, 0].
  const A X[3] = {A(px.X[0]), A(px.X[1]), A(px.X[2])};
  A gX[3] = {A(0), A(0), A(0)};
  V2D_UNROLL
  for (int i = 0; i < 3; ++i) {
    V2D_UNROLL
    for (int j = 0; j < 3; ++j) {
      g_rel[4 * i + j] += gP[i] * X[j];
      gX[j] += A(cam.rel[4 * i + j]) * gP[i];
    }
    g_rel[4 * i + 3] += gP[i];
  }
  if constexpr (K == 7) {
    V2D_UNROLL
    for (int i = 0; i < 3; ++i) {
      V2D_UNROLL
      for (int j = 0; j < 2; ++j) {
        g_rel[4 * i + j] += gq[i] * X[j];
        gX[j] += A(cam.rel[4 * i + j]) * gq[i];
      }
    }
  }
  // X = m / d with m independent of d: dX/dd = -X / d, and X[2] = 1/d.
  g_d = T(-(gX[0] * X[0] + gX[1] * X[1] + gX[2] * X[2]) * X[2]);

  // Intrinsics, with a, x, y, q held fixed: every J_u entry is fx times a function of them (J_v: fy),
  // r_u = target_u - fx x - cx, and X_x = (u - cx) / (fx d) (X_y likewise with fy, cy).
  // sum_i gu_i J_u,i = w_u (J_u.Gs J_u + r_u J_u.g).
  const A JgU = wu * (JGJ_u + ru * Jg_u), JgV = wv * (JGJ_v + rv * Jg_v);
  g_edge[12] += (JgU - gX[0] * X[0]) * ifx - x * dru;
  g_edge[13] += (JgV - gX[1] * X[1]) * ify - y * drv;
  g_edge[14] += -dru - gX[0] * ifx * X[2];
  g_edge[15] += -drv - gX[1] * ify * X[2];
}

}  // namespace v2d
