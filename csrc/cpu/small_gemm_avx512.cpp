// See small_gemm.h. Compiled with -mavx512f (a *_avx512.cpp file); called only where
// cpu_isa_allows_avx512(). The AVX2 kernel's design (op(A) read in place, B packed one strip at a
// time) with twice the register width and twice the registers: a 12 x 32 tile of C is 24 of the 32
// zmm accumulators, so each broadcast of A feeds two 16-float FMAs and each loaded B vector
// twelve.
#include <immintrin.h>

#include "small_gemm.h"
#include "transpose8x8_avx.h"

// Only intrinsics and plain loops here, no std:: templates (see small_gemm_avx2.cpp).

namespace fourm_fast {
namespace {

constexpr int kMR = 12;  // rows of C per register tile: 12 x 2 accumulators + 2 B vectors + 1 broadcast
constexpr int kNR = 32;  // columns of C per register tile: two 16-float vectors

// The first w (may be <= 0 or > 16) of 16 lanes.
inline __mmask16 first_lanes16(int64_t w) {
  return w <= 0 ? static_cast<__mmask16>(0) : w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1u);
}

// One MR x (16 NV) tile of C = alpha * op(A) Bp + beta * C over all k (as the AVX2 tile); NV = 1
// for a strip of at most 16 columns, which would waste half of every FMA with NV = 2. Without
// kFullC only the lanes in m0 / m1 of each 16-float half of C are read and written.
template <int MR, int NV, bool kTransA, bool kFullC>
void tile(int64_t k, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc, float alpha, float beta,
          __mmask16 m0, __mmask16 m1) {
  __m512 acc[NV][MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[v][r] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bp + kk * kNR + 16 * v);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(kTransA ? a[kk * lda + r] : a[r * lda + kk]);
      for (int v = 0; v < NV; ++v) acc[v][r] = _mm512_fmadd_ps(av, bv[v], acc[v][r]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* crow = c + r * ldc;
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mv = v == 0 ? m0 : m1;
      __m512 cv = _mm512_mul_ps(acc[v][r], va);
      if (beta != 0.0f) {  // beta == 0 never reads C (it may hold garbage, even NaN)
        cv = _mm512_fmadd_ps(vb, kFullC ? _mm512_loadu_ps(crow + 16 * v) : _mm512_maskz_loadu_ps(mv, crow + 16 * v), cv);
      }
      if (kFullC) {
        _mm512_storeu_ps(crow + 16 * v, cv);
      } else {
        _mm512_mask_storeu_ps(crow + 16 * v, mv, cv);
      }
    }
  }
}

template <int NV, bool kTransA, bool kFullC>
void row_strips(int64_t m, int64_t k, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc,
                float alpha, float beta, __mmask16 m0, __mmask16 m1) {
  for (int64_t i = 0; i < m; i += kMR) {
    const float* ai = kTransA ? a + i : a + i * lda;
    float* ci = c + i * ldc;
#define FF_TILE(R) tile<R, NV, kTransA, kFullC>(k, ai, lda, bp, ci, ldc, alpha, beta, m0, m1)
    switch (m - i < kMR ? m - i : kMR) {
      case 12: FF_TILE(12); break;
      case 11: FF_TILE(11); break;
      case 10: FF_TILE(10); break;
      case 9: FF_TILE(9); break;
      case 8: FF_TILE(8); break;
      case 7: FF_TILE(7); break;
      case 6: FF_TILE(6); break;
      case 5: FF_TILE(5); break;
      case 4: FF_TILE(4); break;
      case 3: FF_TILE(3); break;
      case 2: FF_TILE(2); break;
      default: FF_TILE(1); break;
    }
#undef FF_TILE
  }
}

// Columns [j, j + w) of op(B) (w <= 32) -> bp, k rows of 32 floats, zero past w (see the AVX2
// pack_strip for why the strip is contiguous).
void pack_strip(bool trans_b, const float* b, int64_t ldb, int64_t k, int64_t j, int64_t w, float* bp) {
  if (!trans_b) {  // B stored k x n: row kk's 32 columns, zero-filled by masked loads
    const __mmask16 m0 = first_lanes16(w), m1 = first_lanes16(w - 16);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* row = b + kk * ldb + j;
      _mm512_storeu_ps(bp + kk * kNR, _mm512_maskz_loadu_ps(m0, row));
      _mm512_storeu_ps(bp + kk * kNR + 16, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    return;
  }
  // B stored n x k: op(B)[kk][j + jj] = b[(j + jj) * ldb + kk], 8 x 8 transposes of whole groups
  // of 8 stored rows, element copies for the rest. A strip of at most 16 columns fills only its
  // first 16 (the NV = 1 tile reads no further).
  const int64_t width = w > 16 ? kNR : 16, full_groups = w / 8;
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    for (int64_t g = 0; g < full_groups; ++g) transpose8x8(b + (j + 8 * g) * ldb + kk, ldb, bp + kk * kNR + 8 * g, kNR);
    for (int64_t q = kk; q < kk + 8; ++q) {
      for (int64_t jj = 8 * full_groups; jj < width; ++jj) bp[q * kNR + jj] = jj < w ? b[(j + jj) * ldb + q] : 0.0f;
    }
  }
  for (; kk < k; ++kk) {
    for (int64_t jj = 0; jj < width; ++jj) bp[kk * kNR + jj] = jj < w ? b[(j + jj) * ldb + kk] : 0.0f;
  }
}

}  // namespace

void small_sgemm_avx512(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                        float* scratch) {
  if (m <= 0 || n <= 0) return;
  for (int64_t j = 0; j < n; j += kNR) {  // one packed k x 32 strip of B, then every row strip of A over it
    const int64_t w = n - j < kNR ? n - j : kNR;
    pack_strip(trans_b, b, ldb, k, j, w, scratch);
    const __mmask16 m0 = first_lanes16(w), m1 = first_lanes16(w - 16);
    if (w == kNR) {
      trans_a ? row_strips<2, true, true>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, m0, m1)
              : row_strips<2, false, true>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, m0, m1);
    } else if (w > 16) {
      trans_a ? row_strips<2, true, false>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, m0, m1)
              : row_strips<2, false, false>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, m0, m1);
    } else {
      trans_a ? row_strips<1, true, false>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, m0, m1)
              : row_strips<1, false, false>(m, k, a, lda, scratch, c + j, ldc, alpha, beta, m0, m1);
    }
  }
}

}  // namespace fourm_fast
