#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace fourm_fast {
namespace {

std::atomic<int> g_isa_override{0};

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512f() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace

void set_cpu_isa(int isa) {
  TORCH_CHECK_VALUE(isa >= 0 && isa <= 3, "fourm_fast: unknown CPU ISA code ", isa,
                    " (0 auto, 1 generic, 2 avx2, 3 avx512)");
  TORCH_CHECK_VALUE(isa != 3 || cpu_has_avx512f(), "fourm_fast: AVX-512 kernels requested but this CPU lacks AVX-512F");
  TORCH_CHECK_VALUE(isa < 2 || cpu_has_avx2_fma(), "fourm_fast: AVX2+FMA kernels requested but this CPU lacks them");
  g_isa_override.store(isa);
}

bool cpu_isa_allows_avx2() { return g_isa_override.load() != 1 && cpu_has_avx2_fma(); }

bool cpu_isa_allows_avx512() {
  const int isa = g_isa_override.load();
  return (isa == 0 || isa == 3) && cpu_has_avx512f() && cpu_has_avx2_fma();
}

const char* cpu_isa_in_use() {
  if (cpu_isa_allows_avx512()) return "avx512";
  return cpu_isa_allows_avx2() ? "avx2+fma" : "generic";
}

}  // namespace fourm_fast
