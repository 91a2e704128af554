// Per-sample math of the cost-volume kernel (backproject_volume), shared by volume_cpu.cpp and
// volume_cuda.cu.
//
// Keyframe pixel (u, v) at depth z: X = z [(u-cx)/fx, (v-cy)/fy, 1]; P = R X + t in the neighbour
// camera (rel = [R | t] row-major); (u', v') = (fx P_x/P_z + cx, fy P_y/P_z + cy). The neighbour's
// features are sampled bilinearly at (u', v'); each of the four taps outside the image contributes
// zero (grid_sample's padding_mode="zeros", align_corners=True), and so does the whole sample when
// P_z <= kVolumeMinDepth (behind the camera).
#pragma once

#include <cmath>

#include "common.h"

namespace v2d {

constexpr double kVolumeMinDepth = 1e-6;

template <typename T>
struct VolumeSample {
  int x0, y0;     // top-left tap
  T wx, wy;       // fractional offsets
  T P[3];         // point in the neighbour camera
  T X[3];         // point in the keyframe camera
  bool valid;
};

template <typename T>
V2D_HOST_DEVICE bool volume_project(T u, T v, T z, const T* rel, const T* intr, VolumeSample<T>& s) {
  const T fx = intr[0], fy = intr[1], cx = intr[2], cy = intr[3];
  s.X[0] = z * (u - cx) / fx;
  s.X[1] = z * (v - cy) / fy;
  s.X[2] = z;
  for (int i = 0; i < 3; ++i) s.P[i] = rel[4 * i] * s.X[0] + rel[4 * i + 1] * s.X[1] + rel[4 * i + 2] * s.X[2] + rel[4 * i + 3];
  s.valid = s.P[2] > T(kVolumeMinDepth);
  if (!s.valid) return false;
  const T up = fx * s.P[0] / s.P[2] + cx, vp = fy * s.P[1] / s.P[2] + cy;
  // Far outside the image (or NaN): no tap can be inside; also keeps the int cast in range.
  if (!(up > T(-2) && vp > T(-2) && up < T(1e7) && vp < T(1e7))) {
    s.valid = false;
    return false;
  }
  const T fu = floor(up), fv = floor(vp);
  s.x0 = static_cast<int>(fu);
  s.y0 = static_cast<int>(fv);
  s.wx = up - fu;
  s.wy = vp - fv;
  return true;
}

// Bilinear read of one channel plane (h x w), zero outside.
template <typename T>
V2D_HOST_DEVICE T volume_tap(const T* plane, int h, int w, int x, int y) {
  return (x >= 0 && x < w && y >= 0 && y < h) ? plane[y * w + x] : T(0);
}

template <typename T>
V2D_HOST_DEVICE T volume_sample(const T* plane, int h, int w, const VolumeSample<T>& s) {
  const T a = volume_tap(plane, h, w, s.x0, s.y0), b = volume_tap(plane, h, w, s.x0 + 1, s.y0);
  const T c = volume_tap(plane, h, w, s.x0, s.y0 + 1), d = volume_tap(plane, h, w, s.x0 + 1, s.y0 + 1);
  return (T(1) - s.wy) * ((T(1) - s.wx) * a + s.wx * b) + s.wy * ((T(1) - s.wx) * c + s.wx * d);
}

// d sample / d (u', v') for one channel plane.
template <typename T>
V2D_HOST_DEVICE void volume_sample_grad_uv(const T* plane, int h, int w, const VolumeSample<T>& s, T& du, T& dv) {
  const T a = volume_tap(plane, h, w, s.x0, s.y0), b = volume_tap(plane, h, w, s.x0 + 1, s.y0);
  const T c = volume_tap(plane, h, w, s.x0, s.y0 + 1), d = volume_tap(plane, h, w, s.x0 + 1, s.y0 + 1);
  du = (T(1) - s.wy) * (b - a) + s.wy * (d - c);
  dv = (T(1) - s.wx) * (c - a) + s.wx * (d - b);
}

// Chain d L/d(u', v') to d L/d rel (12 values, added into g_rel).
template <typename T, typename A>
V2D_HOST_DEVICE void volume_pose_grad(const VolumeSample<T>& s, const T* intr, A gu, A gv, A* g_rel) {
  const A fx = intr[0], fy = intr[1];
  const A iz = A(1) / A(s.P[2]);
  const A gP[3] = {fx * iz * gu, fy * iz * gv, -iz * iz * (fx * A(s.P[0]) * gu + fy * A(s.P[1]) * gv)};
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) g_rel[4 * i + j] += gP[i] * A(s.X[j]);
    g_rel[4 * i + 3] += gP[i];
  }
}

}  // namespace v2d
