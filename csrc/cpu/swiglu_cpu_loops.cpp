// Baseline-ISA copy of the CPU swiglu loops (see swiglu_cpu_loops.h), and the choice between it
// and the AVX2+FMA and AVX-512 copies.
#define FF_SWIGLU_NS swiglu_generic
#include "swiglu_cpu_loops.h"
#include "cpu_isa.h"

namespace fourm_fast {

SwigluLoops swiglu_loops_generic() { return swiglu_generic::loops("generic"); }

SwigluLoops swiglu_loops() {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_isa_allows_avx512()) return swiglu_loops_avx512();
  if (cpu_isa_allows_avx2()) return swiglu_loops_avx2();
#endif
  return swiglu_loops_generic();
}

}  // namespace fourm_fast
