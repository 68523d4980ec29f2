// The swiglu CUDA kernels (launched by swiglu_cuda.cu; tests/cuda_emulation/swiglu_harness.cpp
// runs this same code on the host). Grid-stride loops over the flat contiguous buffers, each
// element through csrc/kernels/swiglu_math.h in float32, rounded once to T.
#pragma once

#include <cstdint>

#include "../kernels/swiglu_math.h"

namespace fourm_fast {

template <class T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = static_cast<T>(kernels::swiglu_fwd(static_cast<float>(a[i]), static_cast<float>(b[i])));
  }
}

template <class T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ da, T* __restrict__ db, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const kernels::SwigluGrads r =
        kernels::swiglu_bwd(static_cast<float>(g[i]), static_cast<float>(a[i]), static_cast<float>(b[i]));
    da[i] = static_cast<T>(r.gate);
    db[i] = static_cast<T>(r.up);
  }
}

}  // namespace fourm_fast
