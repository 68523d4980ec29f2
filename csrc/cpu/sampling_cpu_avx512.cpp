// AVX-512 copy of the CPU sample_tokens rows (compiled with -mavx512f; chosen at run time): the
// same loops, vectorised by the compiler over 16 lanes instead of 8. The arithmetic is integer or
// IEEE-exact (kernels/det_math.h), so every copy draws the same tokens.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define FF_ROWS_NS rows_avx512
#include "sampling_cpu_rows.h"
#include "sampling_cpu_dispatch.h"

namespace fourm_fast {
FF_DEFINE_SAMPLE_ROWS(sample_rows_avx512, rows_avx512)
}  // namespace fourm_fast
