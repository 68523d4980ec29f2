// Portability macros for the torch-free math headers in csrc/kernels/.
// Everything in this folder compiles both as host C++ (the CPU executor) and under nvcc (the CUDA
// executor), so the arithmetic that defines an op is written exactly once.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FF_HOST_DEVICE __host__ __device__
#define FF_INLINE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE
// static: a CPU file compiled twice with different ISA flags (csrc/cpu/*_avx2.cpp) must keep its
// own copy instead of letting the linker merge it with the baseline one.
#define FF_INLINE static inline
#endif

namespace fourm_fast {
namespace kernels {

// Same value on host and device: plain comparisons, no library calls whose ulp error differs.
FF_INLINE bool is_finite_f32(float v) { return v - v == 0.0f; }

FF_INLINE float positive_infinity_f32() { return __builtin_inff(); }

FF_INLINE float quiet_nan_f32() { return __builtin_nanf(""); }

}  // namespace kernels
}  // namespace fourm_fast
