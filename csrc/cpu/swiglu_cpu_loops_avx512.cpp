// AVX-512 copy of the CPU swiglu loops (compiled with -mavx512f; chosen at run time by
// swiglu_loops, see swiglu_cpu_loops.h).
#define FF_SWIGLU_NS swiglu_avx512
#include "swiglu_cpu_loops.h"

namespace fourm_fast {
SwigluLoops swiglu_loops_avx512() { return swiglu_avx512::loops("avx512"); }
}  // namespace fourm_fast
