// Entry points of the per-ISA copies of the CPU swiglu loops (see swiglu_cpu_loops.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fourm_fast {

template <class T>
struct SwigluTypedLoops {
  // out[0:n] = silu(gate) * up
  void (*fwd)(const T* gate, const T* up, T* out, int64_t n);
  // grad_gate[0:n], grad_up[0:n] from grad, gate, up
  void (*bwd)(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t n);
};

struct SwigluLoops {
  SwigluTypedLoops<float> f32;
  SwigluTypedLoops<c10::BFloat16> bf16;
  SwigluTypedLoops<c10::Half> f16;
  const char* isa;
};

// The copy for the CPU this runs on (cpu_isa.h decides; tests force the portable one).
SwigluLoops swiglu_loops();

SwigluLoops swiglu_loops_generic();
#if defined(__x86_64__) || defined(_M_X64)
SwigluLoops swiglu_loops_avx2();
SwigluLoops swiglu_loops_avx512();
#endif

}  // namespace fourm_fast
