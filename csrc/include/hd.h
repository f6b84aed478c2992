// DSF_HD marks index math shared by host and device code: __host__ __device__ under nvcc, a plain
// inline function otherwise, so the CPU tests exercise exactly what the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSF_HD __host__ __device__ __forceinline__
#else
#define DSF_HD inline
#endif
