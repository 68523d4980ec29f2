// Entry points of the per-ISA copies of the CPU masked_attention row passes (see
// attention_cpu_rows.h): the work between a tile's score product and its next product.
#pragma once

#include <cstdint>

namespace fourm_fast {

// One block's score tile, rows x keys, row-major in s, with the metadata of its queries and keys.
struct AttnRowTile {
  float* s;
  int64_t rows, keys;
  const int32_t* valid_lanes;  // k_valid as all-ones / zero, from the tile's first key
  const int32_t* k_segment;    // from the first key; null without segments
  const int32_t* k_rank;       // from the first key; null without ranks
  const int32_t* q_segment;    // from the first query; null without segments
  const int32_t* q_limit;      // from the first query; null without ranks
  float scale;
  float* lse;       // per row: written by softmax_fwd, read by probs_bwd
  float* row_sums;  // per row, softmax_fwd: sum of the row's exp(s - max)
};

struct AttnRowKernels {
  // s = raw scores -> exp(s * scale - row max) at visible keys, 0 elsewhere; lse and row_sums set
  // (lse -inf and sum 0 for a row that sees no key).
  void (*softmax_fwd)(const AttnRowTile& t);
  // s = raw scores -> probabilities exp(s * scale - lse) at visible keys, 0 elsewhere (all 0 for
  // a row whose lse is -inf).
  void (*probs_bwd)(const AttnRowTile& t);
  // ds = dP -> dS = P (dP - delta), delta = sum_d dO * O per row; p, ds rows x keys; g, o rows x D
  // with row strides ldg, ldo.
  void (*dscores)(float* ds, const float* p, const float* g, int64_t ldg, const float* o, int64_t ldo, int64_t rows,
                  int64_t keys, int64_t D);
  // x[0:n] = e^x in place, with the row passes' exponential (a test hook measures its error).
  void (*exp_inplace)(float* x, int64_t n);
  const char* isa;
};

// The copy for the CPU this runs on (cpu_isa.h decides; tests force the portable one).
AttnRowKernels attn_row_kernels();

AttnRowKernels attn_row_kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
AttnRowKernels attn_row_kernels_avx2();
AttnRowKernels attn_row_kernels_avx512();
#endif

}  // namespace fourm_fast
