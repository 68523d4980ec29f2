// Row-major float32 GEMM for the CPU executors' tiles, without ATen's per-call cost.
//
// A tile product in masked_attention is small (128 x 64 x 128 and less); through at::mm each one
// paid dispatch, output allocation and view bookkeeping, about 40 us per (batch, head) pair on
// the 2-core EPYC we measure on, more than the arithmetic at generation-step sizes. This calls
// the BLAS that PyTorch itself links (the Fortran sgemm_ its x86 wheels export from MKL)
// directly, and falls back to ATen over views of the same memory where no sgemm_ is present.
// Products with k <= kSmallGemmMaxK go to fourm_fast's own kernels where the CPU has AVX2+FMA
// (small_gemm.h: no packing of A; the AVX-512 copy where the CPU has AVX-512F).
#pragma once

#include <cstdint>

namespace fourm_fast {

// C (m x n) = alpha * op(A) * op(B) + beta * C, all row-major with row strides lda, ldb, ldc;
// op(X) = X^T when trans_x (A is then stored k x m, B n x k). beta == 0 ignores C's contents.
void sgemm_rows(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// "blas" when sgemm_rows calls the BLAS sgemm_ directly (for products the small kernel does not
// take), "aten" when it goes through at::mm.
const char* cpu_gemm_in_use();

// Tests: true sends every sgemm_rows product through ATen, even where sgemm_ or the small kernel
// would run (exercises the fallback).
void set_cpu_gemm_aten(bool force);

}  // namespace fourm_fast
