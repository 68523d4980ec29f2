// AVX-512 copy of the CPU masked_attention row passes (compiled with -mavx512f; chosen at run time
// by attn_row_kernels, see attention_cpu_rows.h).
#define FF_ATTN_ROWS_NS attn_rows_avx512
#include "attention_cpu_rows.h"

namespace fourm_fast {
AttnRowKernels attn_row_kernels_avx512() {
  namespace ns = attn_rows_avx512;
  return {ns::softmax_fwd_any, ns::probs_bwd_any, ns::dscores, ns::exp_inplace, "avx512"};
}
}  // namespace fourm_fast
