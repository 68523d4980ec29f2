// See cpu_gemm.h.
#include "cpu_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <vector>

#include "cpu_isa.h"
#include "small_gemm.h"

// The Fortran BLAS entry point, weak so that a PyTorch build without it still loads this
// extension (the pointer is then null and the ATen path runs).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace fourm_fast {
namespace {

std::atomic<bool> force_aten{false};

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

at::Tensor rows_view(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  // stored (rows x cols) with row stride ld; transposed when trans
  at::Tensor t = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
  return trans ? t.t() : t;
}

}  // namespace

const char* cpu_gemm_in_use() { return sgemm_ != nullptr && !force_aten.load() ? "blas" : "aten"; }

void set_cpu_gemm_aten(bool force) { force_aten.store(force); }

void sgemm_rows(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta * C
    for (int64_t i = 0; i < m; ++i) {
      float* row = c + i * ldc;
      if (beta == 0.0f) {
        std::fill(row, row + n, 0.0f);
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] *= beta;
      }
    }
    return;
  }
  const bool aten_forced = force_aten.load(std::memory_order_relaxed);
#if defined(__x86_64__) || defined(_M_X64)
  if (!aten_forced && k <= kSmallGemmMaxK && cpu_isa_allows_avx2()) {
    // one packed strip of B, sized for the wider (AVX-512) kernel; allocated here, not in an ISA file
    thread_local std::vector<float> strip;
    if (strip.empty()) strip.resize(static_cast<size_t>(32 * kSmallGemmMaxK));
    if (cpu_isa_allows_avx512()) {
      small_sgemm_avx512(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, strip.data());
    } else {
      small_sgemm_avx2(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, strip.data());
    }
    return;
  }
#endif
  if (sgemm_ != nullptr && !aten_forced && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
      fits_int(ldc)) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same call with the
    // operands swapped, each stored matrix read as its own transpose.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(std::max<int64_t>(ldb, 1)), LDB = static_cast<int>(std::max<int64_t>(lda, 1)),
              LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  const at::Tensor A = trans_a ? rows_view(a, k, m, lda, true) : rows_view(a, m, k, lda, false);
  const at::Tensor B = trans_b ? rows_view(b, n, k, ldb, true) : rows_view(b, k, n, ldb, false);
  at::Tensor C = rows_view(c, m, n, ldc, false);
  C.addmm_(A, B, beta, alpha);
}

}  // namespace fourm_fast
