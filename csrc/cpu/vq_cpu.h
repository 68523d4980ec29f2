// Knobs of the CPU vq_lookup executor that the Python module exposes (tests, fourm-fast info).
#pragma once

namespace fourm_fast {

// 0 = pick the fastest kernel this CPU supports, 1 = portable kernel, 2 = AVX2+FMA kernel.
void set_vq_cpu_isa(int isa);

// The micro-kernel vq_lookup would use now: "avx2+fma" or "generic".
const char* vq_cpu_isa_in_use();

}  // namespace fourm_fast
