// AVX-512 copy of the CPU sample_tokens rows (compiled with -mavx512f; chosen at run time): the
// same loops, vectorised by the compiler over 16 lanes instead of 8. The arithmetic is integer or
// IEEE-exact (kernels/det_math.h), so every copy draws the same tokens. Against the AVX2 copy in
// one process (784 x 16384 float32, 2-core Xeon, ISA codes alternated): 11.9 -> 10.1 ms without
// top-p, 30.6 -> 27.7 ms with top-p 0.9 at temperature 2, no change with top-p at temperature 1
// (25 ms): threshold_select's scalar histogram is most of that row's time.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define FF_ROWS_NS rows_avx512
#include "sampling_cpu_rows.h"
#include "sampling_cpu_dispatch.h"

namespace fourm_fast {
FF_DEFINE_SAMPLE_ROWS(sample_rows_avx512, rows_avx512)
}  // namespace fourm_fast
