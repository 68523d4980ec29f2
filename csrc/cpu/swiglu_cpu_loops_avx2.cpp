// AVX2+FMA copy of the CPU swiglu loops (compiled with -mavx2 -mfma; chosen at run time by
// swiglu_loops, see swiglu_cpu_loops.h).
#define FF_SWIGLU_NS swiglu_avx2
#include "swiglu_cpu_loops.h"

namespace fourm_fast {
SwigluLoops swiglu_loops_avx2() { return swiglu_avx2::loops("avx2+fma"); }
}  // namespace fourm_fast
