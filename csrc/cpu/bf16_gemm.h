// A bfloat16 GEMM on Intel AMX tiles (AMX-BF16) with float32 accumulation, for the bfloat16 CPU
// attention tiles.
//
// The float32 tiles (small_gemm.h) run the FMA units at most 32 multiply-adds per cycle and core;
// one AMX TDPBF16PS does a 16 x 16 x 32 product. At 4M's tile shapes the product itself then costs
// less than packing its operands, so both operands are packed once per call into the layouts the
// tile loads take: op(A) row-major with k padded to 32, op(B) in AMX's pair-interleaved ("VNNI")
// layout. float32 operands (the attention probabilities and score gradients) are rounded to
// bfloat16 (nearest even) as they are packed, as a GPU flash kernel rounds P and dS for its
// tensor cores; products accumulate in float32. Subnormal values count as zero: the conversion
// instruction and TDPBF16PS flush subnormal inputs, products and sums (torch's rounding keeps
// them), an absolute error below 2^-126 per flush, far inside attention's tolerances.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fourm_fast {

// One operand: a row-major matrix of bfloat16 bits (f32 == false) or float32, row stride ld in
// elements, read as its transpose when trans (then stored k x m for A, n x k for B). A float32
// operand is multiplied by scale before it is rounded (a bfloat16 one ignores scale): with alpha
// 1 the tiles store straight into C.
struct Bf16GemmOperand {
  const void* data;
  int64_t ld;
  bool trans;
  bool f32;
  float scale = 1.0f;
};

// Bytes of scratch bf16_gemm_amx needs for these sizes (64-byte aligned by the caller).
size_t bf16_gemm_scratch_bytes(int64_t m, int64_t n, int64_t k);

// C (m x n, float32, row stride ldc) = alpha * op(A) op(B) + beta * C; beta == 0 never reads C.
// Only in builds with FOURM_FAST_WITH_AMX and where cpu_isa_allows_amx() (cpu_isa.h): the CPU has
// AMX-BF16 and AVX512-BF16 and the kernel granted this process the tile state.
void bf16_gemm_amx(int64_t m, int64_t n, int64_t k, float alpha, const Bf16GemmOperand& a,
                   const Bf16GemmOperand& b, float beta, float* c, int64_t ldc, void* scratch);

// dst[r * ldd + c] = bfloat16(src[r * lds + c] * row_scale[r]) (row_scale null: no scaling) for
// r < rows, c < cols: round to nearest even with NaN made quiet, bit for bit c10::BFloat16's
// conversion (subnormals kept), 16 values per step. Same build and CPU condition as bf16_gemm_amx.
void f32_to_bf16_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, const float* row_scale,
                      uint16_t* dst, int64_t ldd);

// dst[r * ldd + c] = float(src[r * lds + c]): exact.
void bf16_to_f32_rows(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);

}  // namespace fourm_fast
