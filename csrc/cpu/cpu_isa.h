// Which CPU micro-kernels may run: detection of AVX2+FMA and a process-wide override that tests and
// benchmarks set through fourm_fast._C._set_cpu_isa.
#pragma once

namespace fourm_fast {

// 0 = fastest this CPU supports, 1 = portable kernels only, 2 = require AVX2+FMA.
void set_cpu_isa(int isa);

// True when the AVX2+FMA kernels may run (CPU support and no override to portable).
bool cpu_isa_allows_avx2();

// True when the ISA is left on auto and the CPU has AVX-512F: sgemm_rows then sends large tile
// products to ATen's GEMM, whose 16-float kernels beat fourm_fast's 8-float one there.
bool cpu_isa_prefers_aten_gemm();

// "avx2+fma" or "generic": what the CPU kernels use now.
const char* cpu_isa_in_use();

}  // namespace fourm_fast
