#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

#if defined(__linux__) && defined(FOURM_FAST_WITH_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// AMX-BF16 and AVX512-BF16 in CPUID, and the tile data state granted by Linux (off until a process
// asks: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), process-wide). Asked once.
bool cpu_has_amx_bf16() {
#if defined(__linux__) && defined(FOURM_FAST_WITH_AMX)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_tile = (d >> 24) & 1u, amx_bf16 = (d >> 22) & 1u;
    if (a < 1 || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;  // a: leaf 7's last subleaf
    const bool avx512_bf16 = (a >> 5) & 1u;
    if (!(amx_tile && amx_bf16 && avx512_bf16 && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl"))) {
      return false;
    }
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

void set_cpu_isa(int isa) {
  TORCH_CHECK_VALUE(isa >= 0 && isa <= 4, "fourm_fast: unknown CPU ISA code ", isa,
                    " (0 auto, 1 generic, 2 avx2, 3 avx512, 4 amx)");
  TORCH_CHECK_VALUE(isa != 4 || (cpu_has_amx_bf16() && cpu_has_avx512f()),
                    "fourm_fast: AMX kernels requested but this build, CPU or kernel offers no AMX-BF16 with "
                    "AVX512-BF16");
  TORCH_CHECK_VALUE(isa < 3 || cpu_has_avx512f(), "fourm_fast: AVX-512 kernels requested but this CPU lacks AVX-512F");
  TORCH_CHECK_VALUE(isa < 2 || cpu_has_avx2_fma(), "fourm_fast: AVX2+FMA kernels requested but this CPU lacks them");
  g_isa_override.store(isa);
}

bool cpu_isa_allows_avx2() { return g_isa_override.load() != 1 && cpu_has_avx2_fma(); }

bool cpu_isa_allows_avx512() {
  const int isa = g_isa_override.load();
  return (isa == 0 || isa >= 3) && cpu_has_avx512f() && cpu_has_avx2_fma();
}

bool cpu_isa_allows_amx() {
  const int isa = g_isa_override.load();
  return (isa == 0 || isa == 4) && cpu_isa_allows_avx512() && cpu_has_amx_bf16();
}

const char* cpu_isa_in_use() {
  if (cpu_isa_allows_amx()) return "avx512+amx";
  if (cpu_isa_allows_avx512()) return "avx512";
  return cpu_isa_allows_avx2() ? "avx2+fma" : "generic";
}

}  // namespace fourm_fast
