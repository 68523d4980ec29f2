// Baseline-ISA copy of the CPU masked_attention row passes (see attention_cpu_rows.h), and the
// choice between it and the AVX2+FMA and AVX-512 copies.
#define FF_ATTN_ROWS_NS attn_rows_generic
#include "attention_cpu_rows.h"
#include "cpu_isa.h"

namespace fourm_fast {

AttnRowKernels attn_row_kernels_generic() {
  namespace ns = attn_rows_generic;
  return {ns::softmax_fwd_any, ns::probs_bwd_any, ns::dscores, ns::exp_inplace, "generic"};
}

AttnRowKernels attn_row_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_isa_allows_avx512()) return attn_row_kernels_avx512();
  if (cpu_isa_allows_avx2()) return attn_row_kernels_avx2();
#endif
  return attn_row_kernels_generic();
}

}  // namespace fourm_fast
