// Portability macros shared by the per-pixel math headers (host + device).
#pragma once

#if defined(__CUDACC__)
#define V2D_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced like __forceinline__: the CPU kernels call these per vector of pixels in their inner loop.
#define V2D_HOST_DEVICE inline __attribute__((always_inline))
#else
#define V2D_HOST_DEVICE inline
#endif

// Fully unroll the next (short, constant trip count) loop, so that indices become constants.
#if defined(__CUDACC__) || defined(__clang__)
#define V2D_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define V2D_UNROLL _Pragma("GCC unroll 16")
#else
#define V2D_UNROLL
#endif
