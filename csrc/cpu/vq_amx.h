// The bfloat16 vq_lookup search on Intel AMX tiles (vq_search_amx.cpp), called by vq_cpu.cpp.
//
// The float32 search (vq_cpu.cpp) widens bfloat16 rows and codes and multiplies them with FMAs;
// here the tiles take them as they are: products of two bfloat16 values are exact in float32 and
// accumulate in float32, as the float32 search's, only in another order. Each 32 x 32 block of
// dot products becomes scores (kernels::vq_score's single fused multiply-add) folded into a
// running per-lane minimum, so the N x K matrix never exists.
//
// TDPBF16PS flushes subnormal inputs, products and sums to zero: each flush loses less than
// 2^-126 of a score. That stays inside the float32 search's own error bound, (D + 2) u |x| |c|,
// as long as no nonzero row or code has all its values below kVqAmxMinMagnitude (2^-50);
// vq_cpu.cpp checks both (vq_amx_rows_in_range, vq_amx_codes_in_range) and otherwise runs the
// float32 search (a review found bfloat16 data at 1e-20 picking wrong codes on the tiles).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fourm_fast {

// Best score and index per lane for one row: lane l sees codes l, l + 16, l + 32, ... in
// increasing order, and a strict '<' keeps the first of equal scores.
struct alignas(64) VqLaneBest16 {
  float score[16];
  int32_t index[16];
};

constexpr float kVqAmxMinMagnitude = 8.8817842e-16f;  // 2^-50
constexpr uint16_t kVqAmxMinMagnitudeBf16 = 0x2680;     // its bfloat16 bits (exponent 77)

// True when every row of x (bfloat16 bits, row stride xs0, unit stride along D) is all zero or
// has a value of magnitude >= kVqAmxMinMagnitude (NaN and inf count as large).
bool vq_amx_rows_in_range(const uint16_t* x, int64_t xs0, int64_t rows, int64_t D);

// The same for the codes of float32 code panels [panel][D][16].
bool vq_amx_codes_in_range(const float* panels_f32, int64_t panels, int64_t D);

// Words of the codebook in the tiles' pair layout: [panel][k32 / 2][16], word (q, c) =
// code c's values 2q and 2q + 1 as bfloat16 bits (low, high), k32 = D rounded up to 32.
size_t vq_amx_codebook_words(int64_t panels, int64_t D);

// float32 code panels [panel][D][16] (values exact in bfloat16) -> the pair layout.
void vq_amx_pack_codebook(const float* panels_f32, int64_t panels, int64_t D, uint32_t* out);

// Bytes of scratch vq_search_amx needs for up to `rows` rows.
size_t vq_search_amx_scratch_bytes(int64_t rows, int64_t D);

// Rows [0, rows) of x (bfloat16 bits, row stride xs0, unit stride along D) against every code
// panel: best[r] folds in score = fma(scale, <x_r, c>, bias[c]) of each code c. best holds rows
// entries, initialised by the caller; scratch 64-byte aligned. Only where cpu_isa_allows_amx().
void vq_search_amx(const uint16_t* x, int64_t xs0, int64_t rows, int64_t D, const uint32_t* codes,
                   const float* bias, int64_t panels, float scale, VqLaneBest16* best, void* scratch);

}  // namespace fourm_fast
