// Portability macros shared by the per-pixel math headers (host + device).
#pragma once

#if defined(__CUDACC__)
#define V2D_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define V2D_HOST_DEVICE inline
#endif
