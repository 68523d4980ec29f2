// See small_gemm.h. Compiled with -mavx2 -mfma (a *_avx2.cpp file); called only where
// cpu_isa_allows_avx2().
#include "small_gemm.h"

#include <immintrin.h>

#include "transpose8x8_avx.h"

// Only intrinsics and plain loops here, no std:: templates: an out-of-line copy of one instantiated
// in this AVX2 file could be the copy the linker keeps for the whole library.

namespace fourm_fast {
namespace {

constexpr int kMR = 6;   // rows of C per register tile: 6 x 2 accumulators + 2 B vectors + 1 broadcast
constexpr int kNR = 16;  // columns of C per register tile: two 8-float vectors

// All-ones in the first w (<= 8, may be <= 0) int32 lanes.
inline __m256i first_lanes(int64_t w) {
  const int lanes = w < 0 ? 0 : (w > 8 ? 8 : static_cast<int>(w));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One MR x 16 tile of C: C = alpha * op(A) Bp + beta * C over all k. a points at the tile's first
// row of op(A) (kTransA: A is stored k x m, so row r of op(A) is column r of the storage); bp is
// the packed strip of B (k rows of 16 floats, zero past the matrix's last column); c points at the
// tile's first element. Without kFullC, only the lanes in mask0 / mask1 of each 8-float half of C
// are read and written.
template <int MR, bool kTransA, bool kFullC>
void tile(int64_t k, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc, float alpha, float beta,
          __m256i mask0, __m256i mask1) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(bp + kk * kNR), b1 = _mm256_loadu_ps(bp + kk * kNR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(kTransA ? a + kk * lda + r : a + r * lda + kk);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* crow = c + r * ldc;
    __m256 c0 = _mm256_mul_ps(acc0[r], va), c1 = _mm256_mul_ps(acc1[r], va);
    if (beta != 0.0f) {  // beta == 0 never reads C (it may hold garbage, even NaN)
      c0 = _mm256_fmadd_ps(vb, kFullC ? _mm256_loadu_ps(crow) : _mm256_maskload_ps(crow, mask0), c0);
      c1 = _mm256_fmadd_ps(vb, kFullC ? _mm256_loadu_ps(crow + 8) : _mm256_maskload_ps(crow + 8, mask1), c1);
    }
    if (kFullC) {
      _mm256_storeu_ps(crow, c0);
      _mm256_storeu_ps(crow + 8, c1);
    } else {
      _mm256_maskstore_ps(crow, mask0, c0);
      _mm256_maskstore_ps(crow + 8, mask1, c1);
    }
  }
}

template <bool kTransA, bool kFullC>
void row_strips(int64_t m, int64_t k, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc,
                float alpha, float beta, __m256i mask0, __m256i mask1) {
  for (int64_t i = 0; i < m; i += kMR) {
    const float* ai = kTransA ? a + i : a + i * lda;
    float* ci = c + i * ldc;
    switch (m - i < kMR ? m - i : kMR) {
      case 6: tile<6, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, mask0, mask1); break;
      case 5: tile<5, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, mask0, mask1); break;
      case 4: tile<4, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, mask0, mask1); break;
      case 3: tile<3, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, mask0, mask1); break;
      case 2: tile<2, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, mask0, mask1); break;
      default: tile<1, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, mask0, mask1); break;
    }
  }
}

// Columns [j, j + w) of op(B) (w <= 16) -> bp, k rows of 16 floats, zero past w. Contiguous rows
// keep the strip in few L1 sets: read in place with a row stride of 256 or 512 bytes, a 128-row
// strip fell into 16 or 8 of the 64 sets and evicted itself.
void pack_strip(bool trans_b, const float* b, int64_t ldb, int64_t k, int64_t j, int64_t w, float* bp) {
  if (!trans_b) {  // B stored k x n: row kk's 16 columns, zero-filled by masked loads
    const __m256i mask0 = first_lanes(w), mask1 = first_lanes(w - 8);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* row = b + kk * ldb + j;
      _mm256_storeu_ps(bp + kk * kNR, w == kNR ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, mask0));
      _mm256_storeu_ps(bp + kk * kNR + 8, w == kNR ? _mm256_loadu_ps(row + 8) : _mm256_maskload_ps(row + 8, mask1));
    }
    return;
  }
  // B stored n x k: op(B)[kk][j + jj] = b[(j + jj) * ldb + kk], a transpose of 16 stored rows
  int64_t kk = 0;
  if (w == kNR) {
    for (; kk + 8 <= k; kk += 8) {
      transpose8x8(b + j * ldb + kk, ldb, bp + kk * kNR, kNR);
      transpose8x8(b + (j + 8) * ldb + kk, ldb, bp + kk * kNR + 8, kNR);
    }
  }
  for (; kk < k; ++kk) {
    for (int64_t jj = 0; jj < kNR; ++jj) bp[kk * kNR + jj] = jj < w ? b[(j + jj) * ldb + kk] : 0.0f;
  }
}

}  // namespace

void small_sgemm_avx2(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                      int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                      float* scratch) {
  if (m <= 0 || n <= 0) return;
  for (int64_t j = 0; j < n; j += kNR) {  // one packed k x 16 strip of B, then every row strip of A over it
    const int64_t w = n - j < kNR ? n - j : kNR;
    pack_strip(trans_b, b, ldb, k, j, w, scratch);
    const __m256i mask0 = first_lanes(w), mask1 = first_lanes(w - 8);
    if (w == kNR) {
      trans_a ? row_strips<true, true>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, mask0, mask1)
              : row_strips<false, true>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, mask0, mask1);
    } else {
      trans_a ? row_strips<true, false>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, mask0, mask1)
              : row_strips<false, false>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, mask0, mask1);
    }
  }
}

}  // namespace fourm_fast
