// Which CPU micro-kernels may run: detection of AVX2+FMA, AVX-512F and AMX-BF16, and a process-wide
// override that tests and benchmarks set through fourm_fast._C._set_cpu_isa.
#pragma once

namespace fourm_fast {

// 0 = fastest this CPU supports, 1 = portable kernels only, 2 = AVX2+FMA kernels (never
// fourm_fast's AVX-512 copies), 3 = require AVX-512F (with AVX2+FMA for the kernels that have no
// AVX-512 copy; never AMX), 4 = require AMX-BF16 as well (the bfloat16 attention tiles on AMX).
// Only fourm_fast's own kernels follow it: products past them (sgemm_rows with k >
// kSmallGemmMaxK) run on MKL or ATen, which choose their own ISA.
void set_cpu_isa(int isa);

// True when the AVX2+FMA kernels may run (CPU support and no override to portable).
bool cpu_isa_allows_avx2();

// True when the AVX-512 copies (small GEMM, attention row passes) may run: the CPU has AVX-512F
// and AVX2+FMA, and the override is auto, 3 or 4.
bool cpu_isa_allows_avx512();

// True when the AMX bfloat16 GEMM (bf16_gemm.h) may run: the build has it (FOURM_FAST_WITH_AMX),
// the AVX-512 kernels may run, the CPU has AMX-BF16 and AVX512-BF16, Linux granted the process the
// AMX tile state, and the override is auto or 4. The first call asks Linux for that state
// (process-wide, as oneDNN does for PyTorch's own AMX GEMMs): from then on every signal frame
// holds the 8 KiB tile data, so an alternate signal stack below about 11 KiB is refused.
bool cpu_isa_allows_amx();

// "avx512+amx", "avx512", "avx2+fma" or "generic": the widest CPU kernels in use now.
const char* cpu_isa_in_use();

}  // namespace fourm_fast
