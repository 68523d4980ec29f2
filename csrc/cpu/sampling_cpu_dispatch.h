// Entry points of the per-ISA copies of the CPU sample_tokens rows (see sampling_cpu_rows.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../kernels/sampling_math.h"

namespace fourm_fast {

#define FF_SAMPLE_ROWS_SIGNATURE(name, T)                                                                \
  void name(const T* cond, int64_t cs0, int64_t cs1, const T* uncond, int64_t us0, int64_t us1, int64_t V, \
            const kernels::SampleParams* params, int64_t params_stride, uint64_t seed, uint64_t offset,   \
            int64_t r0, int64_t r1, int64_t* tokens, float* probs, int32_t* status)

#define FF_DECLARE_SAMPLE_ROWS(name)               \
  FF_SAMPLE_ROWS_SIGNATURE(name, float);           \
  FF_SAMPLE_ROWS_SIGNATURE(name, c10::BFloat16);   \
  FF_SAMPLE_ROWS_SIGNATURE(name, c10::Half);

#define FF_DEFINE_ONE(name, ns, T)                                                                          \
  FF_SAMPLE_ROWS_SIGNATURE(name, T) {                                                                       \
    ns::sample_rows<T>(cond, cs0, cs1, uncond, us0, us1, V, params, params_stride, seed, offset, r0, r1,   \
                       tokens, probs, status);                                                              \
  }

#define FF_DEFINE_SAMPLE_ROWS(name, ns) \
  FF_DEFINE_ONE(name, ns, float)        \
  FF_DEFINE_ONE(name, ns, c10::BFloat16) \
  FF_DEFINE_ONE(name, ns, c10::Half)

FF_DECLARE_SAMPLE_ROWS(sample_rows_generic)
#if defined(__x86_64__) || defined(_M_X64)
FF_DECLARE_SAMPLE_ROWS(sample_rows_avx2)
FF_DECLARE_SAMPLE_ROWS(sample_rows_avx512)
#endif

}  // namespace fourm_fast
