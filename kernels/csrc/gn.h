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
#pragma once

#include "common.h"

namespace v2d {

template <typename T, int K>
struct GNPixel {
  T Ju[K];
  T Jv[K];
  T r[2];
  T w[2];
  // Intermediates the backward pass needs.
  T X[3];  // back-projected point in the source camera
  T q[3];  // R [X_x, X_y, 0] (focal column only)
  T a, x, y, d;
  bool valid;
};

// Linearise one pixel. Returns px.valid; invalid pixels must contribute nothing.
template <typename T, int K>
V2D_HOST_DEVICE bool gn_linearize(T u, T v, T d, const T* rel, const T* intr, const T* target, const T* weight,
                                  T min_depth, GNPixel<T, K>& px) {
  const T fx = intr[0], fy = intr[1], cx = intr[2], cy = intr[3];
  px.valid = false;
  px.d = d;
  if (!(d > T(0))) return false;
  px.X[0] = (u - cx) / fx / d;
  px.X[1] = (v - cy) / fy / d;
  px.X[2] = T(1) / d;
  const T P0 = rel[0] * px.X[0] + rel[1] * px.X[1] + rel[2] * px.X[2] + rel[3];
  const T P1 = rel[4] * px.X[0] + rel[5] * px.X[1] + rel[6] * px.X[2] + rel[7];
  const T P2 = rel[8] * px.X[0] + rel[9] * px.X[1] + rel[10] * px.X[2] + rel[11];
  if (!(P2 > min_depth)) return false;
  const T a = T(1) / P2, x = P0 * a, y = P1 * a;
  px.a = a;
  px.x = x;
  px.y = y;
  px.Ju[0] = fx * a;
  px.Ju[1] = T(0);
  px.Ju[2] = -fx * x * a;
  px.Ju[3] = -fx * x * y;
  px.Ju[4] = fx * (T(1) + x * x);
  px.Ju[5] = -fx * y;
  px.Jv[0] = T(0);
  px.Jv[1] = fy * a;
  px.Jv[2] = -fy * y * a;
  px.Jv[3] = -fy * (T(1) + y * y);
  px.Jv[4] = fy * x * y;
  px.Jv[5] = fy * x;
  if constexpr (K == 7) {
    for (int i = 0; i < 3; ++i) px.q[i] = rel[4 * i] * px.X[0] + rel[4 * i + 1] * px.X[1];
    px.Ju[6] = fx * (x - a * (px.q[0] - x * px.q[2]));
    px.Jv[6] = fy * (y - a * (px.q[1] - y * px.q[2]));
  }
  px.r[0] = target[0] - (fx * x + cx);
  px.r[1] = target[1] - (fy * y + cy);
  px.w[0] = weight[0];
  px.w[1] = weight[1];
  px.valid = true;
  return true;
}

// H (K*K, only the upper triangle i <= j is written) and b (K) accumulate in type A.
template <typename T, int K, typename A>
V2D_HOST_DEVICE void gn_accumulate(const GNPixel<T, K>& px, A* H, A* b) {
  const A wu = px.w[0], wv = px.w[1];
  const A ru = wu * A(px.r[0]), rv = wv * A(px.r[1]);
  for (int i = 0; i < K; ++i) {
    const A ui = wu * A(px.Ju[i]), vi = wv * A(px.Jv[i]);
    for (int j = i; j < K; ++j) H[i * K + j] += ui * A(px.Ju[j]) + vi * A(px.Jv[j]);
    b[i] += A(px.Ju[i]) * ru + A(px.Jv[i]) * rv;
  }
}

// Number of per-edge values the backward reduces: dL/drel (12) then dL/d(fx, fy, cx, cy) (4).
constexpr int kGNEdgeGrads = 16;

// Backward of one valid pixel given Gs = G + G^T for G = dL/dH (K*K, full; callers form it once per
// edge) and g = dL/db (K).
// Writes dL/dd, dL/dtarget (2), dL/dweight (2) and adds dL/drel (12) then dL/dintrinsics (4) into
// g_edge (kGNEdgeGrads values).
template <typename T, int K, typename A>
V2D_HOST_DEVICE void gn_pixel_backward(const GNPixel<T, K>& px, const T* rel, const T* intr, const T* Gs,
                                       const T* g, T& g_d, T* g_target, T* g_weight, A* g_edge) {
  A* g_rel = g_edge;
  const A fx = intr[0], fy = intr[1];
  const A wu = px.w[0], wv = px.w[1], ru = px.r[0], rv = px.r[1];
  const A a = px.a, x = px.x, y = px.y;

  // dL/dJ rows: w (G + G^T) J + w r g;  dL/dr = w J.g;  dL/dw = J^T G J + r J.g
  A gu[K], gv[K];
  A Jg_u = 0, Jg_v = 0, JGJ_u = 0, JGJ_v = 0;
  for (int i = 0; i < K; ++i) {
    A su = 0, sv = 0;
    for (int j = 0; j < K; ++j) {
      const A s = A(Gs[i * K + j]);
      su += s * A(px.Ju[j]);
      sv += s * A(px.Jv[j]);
    }
    gu[i] = wu * su + wu * ru * A(g[i]);
    gv[i] = wv * sv + wv * rv * A(g[i]);
    Jg_u += A(px.Ju[i]) * A(g[i]);
    Jg_v += A(px.Jv[i]) * A(g[i]);
    JGJ_u += A(px.Ju[i]) * su;  // su = Gs J, so J.su = 2 J^T G J
    JGJ_v += A(px.Jv[i]) * sv;
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
  A gq[3] = {0, 0, 0};
  if constexpr (K == 7) {
    const A q0 = px.q[0], q1 = px.q[1], q2 = px.q[2];
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
  A gX[3] = {0, 0, 0};
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      g_rel[4 * i + j] += gP[i] * A(px.X[j]);
      gX[j] += A(rel[4 * i + j]) * gP[i];
    }
    g_rel[4 * i + 3] += gP[i];
  }
  if constexpr (K == 7) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 2; ++j) {
        g_rel[4 * i + j] += gq[i] * A(px.X[j]);
        gX[j] += A(rel[4 * i + j]) * gq[i];
      }
    }
  }
  // X = m / d with m independent of d: dX/dd = -X / d.
  const A d = px.d;
  g_d = T(-(gX[0] * A(px.X[0]) + gX[1] * A(px.X[1]) + gX[2] * A(px.X[2])) / d);

  // Intrinsics, with a, x, y, q held fixed: every J_u entry is fx times a function of them (J_v: fy),
  // r_u = target_u - fx x - cx, and X_x = (u - cx) / (fx d) (X_y likewise with fy, cy).
  A JgU = 0, JgV = 0;
  for (int i = 0; i < K; ++i) {
    JgU += gu[i] * A(px.Ju[i]);
    JgV += gv[i] * A(px.Jv[i]);
  }
  g_edge[12] += (JgU - gX[0] * A(px.X[0])) / fx - x * dru;
  g_edge[13] += (JgV - gX[1] * A(px.X[1])) / fy - y * drv;
  g_edge[14] += -dru - gX[0] / (fx * d);
  g_edge[15] += -drv - gX[1] / (fy * d);
}

}  // namespace v2d
