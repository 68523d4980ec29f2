// AVX2+FMA copy of the CPU sample_tokens rows (compiled with -mavx2 -mfma; chosen at run time).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define FF_ROWS_NS rows_avx2
#include "sampling_cpu_rows.h"
#include "sampling_cpu_dispatch.h"

namespace fourm_fast {
FF_DEFINE_SAMPLE_ROWS(sample_rows_avx2, rows_avx2)
}  // namespace fourm_fast
