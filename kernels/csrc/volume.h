// Per-sample math of the cost-volume kernel (backproject_volume), shared by volume_cpu.cpp and
// volume_cuda.cu, so that the CPU tests check the arithmetic the GPU runs.
//
// Keyframe pixel (u, v) at depth z: X = z [(u-cx)/fx, (v-cy)/fy, 1]; P = R X + t in the neighbour
// camera (rel = [R | t] row-major); (u', v') = (fx P_x/P_z + cx, fy P_y/P_z + cy), with the same
// intrinsics row for the back-projection and the projection. The neighbour's features are sampled
// bilinearly at (u', v'); each of the four taps outside the image contributes zero (grid_sample's
// padding_mode="zeros", align_corners=True), and the whole sample is zero when
// P_z <= kVolumeMinDepth (behind the camera).
//
// A sample is split in two so that the channel loop does no geometry: volume_project + volume_taps
// run once per (neighbour, depth, pixel); volume_gather / volume_interp* run per channel.
#pragma once

#include "common.h"

namespace v2d {

// Points at or closer than this (in the neighbour camera) are treated as behind it. Must equal
// kernels.reference.VOLUME_MIN_DEPTH.
constexpr double kVolumeMinDepth = 1e-6;

template <typename T>
struct VolumeSample {
  T X[3];  // point in the keyframe camera
  T P[3];  // point in the neighbour camera
  T up, vp;
  bool valid;  // in front of the camera
};

// Bilinear taps of one sample, ordered (x0,y0), (x0+1,y0), (x0,y0+1), (x0+1,y0+1).
template <typename T>
struct VolumeTaps {
  int off[4];  // y * w + x within a channel plane; 0 for taps outside the image
  T wt[4];     // bilinear weights
  T wx, wy;    // fractional position inside the tap square
  bool in[4];  // tap inside the image
  bool all_in;
};

template <typename T>
V2D_HOST_DEVICE bool volume_project(T u, T v, T z, const T* rel, const T* intr, VolumeSample<T>& s) {
  const T fx = intr[0], fy = intr[1], cx = intr[2], cy = intr[3];
  s.X[0] = z * (u - cx) / fx;
  s.X[1] = z * (v - cy) / fy;
  s.X[2] = z;
  for (int i = 0; i < 3; ++i)
    s.P[i] = rel[4 * i] * s.X[0] + rel[4 * i + 1] * s.X[1] + rel[4 * i + 2] * s.X[2] + rel[4 * i + 3];
  s.valid = s.P[2] > T(kVolumeMinDepth);
  if (!s.valid) return false;
  const T iz = T(1) / s.P[2];
  s.up = fx * s.P[0] * iz + cx;
  s.vp = fy * s.P[1] * iz + cy;
  return true;
}

// Returns false when no tap is inside an h x w image (sample and its gradients are then zero).
// The range test comes first so that NaN or huge coordinates never reach the int conversion.
template <typename T>
V2D_HOST_DEVICE bool volume_taps(const VolumeSample<T>& s, int h, int w, VolumeTaps<T>& t) {
  if (!(s.valid && s.up >= T(-1) && s.up < T(w) && s.vp >= T(-1) && s.vp < T(h))) return false;
  // floor by truncation (the values are >= -1 here), so that one conversion gives both the tap
  // index and the fractional weight without a float floor followed by an int cast.
  int x0 = static_cast<int>(s.up), y0 = static_cast<int>(s.vp);
  x0 -= T(x0) > s.up;
  y0 -= T(y0) > s.vp;
  const T wx = s.up - T(x0), wy = s.vp - T(y0);
  const bool inx[2] = {x0 >= 0, x0 + 1 < w}, iny[2] = {y0 >= 0, y0 + 1 < h};
  const T ax[2] = {T(1) - wx, wx}, ay[2] = {T(1) - wy, wy};
  t.wx = wx;
  t.wy = wy;
  t.all_in = true;
  for (int k = 0; k < 4; ++k) {
    const int i = k & 1, j = k >> 1;
    t.in[k] = inx[i] && iny[j];
    t.all_in = t.all_in && t.in[k];
    t.off[k] = t.in[k] ? (y0 + j) * w + x0 + i : 0;
    t.wt[k] = ax[i] * ay[j];
  }
  return true;
}

// The four tap values of one channel plane (zero outside the image). kAllIn skips the tests for
// the common case of a sample well inside the image.
template <bool kAllIn, typename T>
V2D_HOST_DEVICE void volume_gather(const T* plane, const VolumeTaps<T>& t, T v[4]) {
  for (int k = 0; k < 4; ++k) v[k] = (kAllIn || t.in[k]) ? plane[t.off[k]] : T(0);
}

template <typename T>
V2D_HOST_DEVICE T volume_interp(const VolumeTaps<T>& t, const T v[4]) {
  return t.wt[0] * v[0] + t.wt[1] * v[1] + t.wt[2] * v[2] + t.wt[3] * v[3];
}

// d sample / d (u', v') from the tap values.
template <typename T>
V2D_HOST_DEVICE void volume_interp_grad_uv(const VolumeTaps<T>& t, const T v[4], T& du, T& dv) {
  du = (T(1) - t.wy) * (v[1] - v[0]) + t.wy * (v[3] - v[2]);
  dv = (T(1) - t.wx) * (v[2] - v[0]) + t.wx * (v[3] - v[1]);
}

// Chains d L / d(u', v') of one sample to d L / d rel (12 values, added into g_rel).
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
