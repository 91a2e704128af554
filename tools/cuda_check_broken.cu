// Deliberately broken CUDA source: tools/cuda_check.py compiles it and requires nvcc to REJECT it,
// so a passing `make cuda-check` shows that the compiler really checks device code (a check that
// cannot fail proves nothing). Apart from the one defect below the file is valid: it includes the
// shared header the real kernels use, so it is rejected for the defect, not for a missing include.
//
// The defect: a __device__ function calls a host-only function. A host C++ compiler accepts this
// (it does not know __device__); only nvcc's device pass rejects it.
#include "gn.h"

double host_only_scale(double x) { return 2.0 * x; }

__device__ double scaled_residual(const v2d::GNPixel<double, 6>& px) { return host_only_scale(px.r[0]); }

__global__ void broken_kernel(const double* rel, const double* intr, double* out) {
  v2d::GNCamera<double> cam;
  v2d::gn_camera(rel, intr, 0.1, cam);
  v2d::GNPixel<double, 6> px;
  if (v2d::gn_linearize<double, 6>(0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, cam, px)) out[0] = scaled_residual(px);
}
