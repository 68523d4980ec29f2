// A float32 GEMM for the small, cache-resident tiles of the CPU attention executor, without the
// operand packing a general BLAS does on every call.
//
// At the tile shapes of 4M's attention (128 x 128 x 64 and smaller), perf on the 2-core EPYC put
// MKL's packing routines (sgemm_scopy_*, mscale) at about a third of its sgemm kernel's time. Here
// every operand already sits in L1/L2: a register-tile kernel (AVX2, or AVX-512 where the CPU has
// it) reads op(A) where it is and packs only B, one 16- or 32-column strip at a time (transposing it on the way for the score products
// Q K^T and dO V^T), which costs one pass over B against m / 6 passes of arithmetic.
#pragma once

#include <cstdint>

namespace fourm_fast {

// Largest k (the summed dimension) small_sgemm takes: a 16-column strip of B (k x 16 floats)
// should stay in L1 while all row strips of A pass over it.
constexpr int64_t kSmallGemmMaxK = 512;

// C (m x n) = alpha * op(A) * op(B) + beta * C, row-major with row strides lda, ldb, ldc, exactly
// as sgemm_rows (cpu_gemm.h). beta == 0 never reads C. scratch holds 16 * k floats (one packed
// strip of B). AVX2+FMA only: the caller checks cpu_isa_allows_avx2() and
// k <= kSmallGemmMaxK.
void small_sgemm_avx2(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                      int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc, float* scratch);

// The same with 16-float AVX-512 vectors and 32-column strips: scratch holds 32 * k floats. The
// caller checks cpu_isa_allows_avx512() and k <= kSmallGemmMaxK.
void small_sgemm_avx512(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc, float* scratch);

}  // namespace fourm_fast
