// See bf16_gemm.h. Compiled with AMX-TILE, AMX-BF16, AVX512-BF16/BW/VL (an *_amx.cpp file); called
// only where cpu_isa_allows_amx().
//
// Layouts (m16, n16: m, n rounded up to 16; k32: k rounded up to 32; padding is zeros, so padded
// rows, columns and k steps add nothing):
//   Ap: op(A) as m16 rows of k32 bfloat16; an A tile is 16 rows x 32 values of it.
//   Bp: op(B) as k32 / 2 rows of n16 32-bit words, word (p, j) = op(B)[2p][j] | op(B)[2p+1][j] << 16
//       (the pair layout TDPBF16PS takes); a B tile is 16 such rows x 16 words.
// C is computed in 32 x 32 blocks (four 16 x 16 float32 accumulator tiles, two A and two B tiles:
// all eight tile registers), stored by the tiles into C where the block lies inside it and alpha
// is 1 (beta 1: C is loaded into the accumulators first), else into a scratch block scaled into C
// with masked stores. A bfloat16 op(A) stored row-major with k a multiple of 32 is read by the
// tile loads in place.
// GCC 12's avx512fintrin.h builds its "undefined" pass-through vectors by self-initialisation,
// which -Wall reports at every inlined unpack; nothing here reads an uninitialised value.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "amx_tiles.h"
#include "bf16_gemm.h"

// Only intrinsics and plain loops here, no std:: templates (see small_gemm_avx2.cpp).

namespace fourm_fast {
namespace {

constexpr int64_t kBlock = 32;  // rows and columns of C per block: two tiles each way

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
int64_t clamp16(int64_t x) { return x < 0 ? 0 : x > 16 ? 16 : x; }
int64_t clamp32(int64_t x) { return x < 0 ? 0 : x > 32 ? 32 : x; }
__mmask16 lanes16(int64_t w) { return static_cast<__mmask16>((1u << clamp16(w)) - 1u); }
__mmask32 lanes32(int64_t w) { return w >= 32 ? ~static_cast<__mmask32>(0) : static_cast<__mmask32>((1u << clamp32(w)) - 1u); }

// How an operand's values are read: float32 ones are multiplied by scale, then rounded.
struct Source {
  bool f32;
  __m512 scale;
};

// 16 values at p (float32 or bfloat16 bits), the first count of them, as bfloat16 bits; the rest 0.
__m256i load16(const char* p, const Source& src, int64_t count) {
  if (src.f32) {
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(count), p), src.scale);
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  }
  return _mm256_maskz_loadu_epi16(lanes16(count), p);
}

// 32 values at p as bfloat16 bits, the first count of them; the rest 0.
__m512i load32(const char* p, const Source& src, int64_t count) {
  if (src.f32) {
    const float* f = reinterpret_cast<const float*>(p);
    const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(count), f), src.scale);
    const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(count - 16), f + 16), src.scale);
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  }
  return _mm512_maskz_loadu_epi16(lanes32(count), p);
}

// Word i = row0[i] | row1[i] << 16 for i < 16 (the first count values of each row; a null row is 0).
__m512i pairs16(const char* row0, const char* row1, const Source& src, int64_t count) {
  const __m256i z = _mm256_setzero_si256();
  const __m512i lo = _mm512_cvtepu16_epi32(row0 ? load16(row0, src, count) : z);
  const __m512i hi = _mm512_cvtepu16_epi32(row1 ? load16(row1, src, count) : z);
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

Source source(const Bf16GemmOperand& x) { return {x.f32, _mm512_set1_ps(x.f32 ? x.scale : 1.0f)}; }

// v[i][j] -> v[j][i] for a 16 x 16 matrix of 32-bit words: words interleaved within 128-bit lanes
// (pairs of rows, then quads), which leaves 4 x 4 blocks transposed in place, then the lanes
// exchanged in two rounds of 128-bit shuffles.
void transpose16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // b[g + c], lane L: column 4L + c of rows g .. g + 3
    b[g + 0] = _mm512_unpacklo_epi64(a[g + 0], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g + 0], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c = lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x88), e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xDD);
    const __m512i f0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x88),
                  f1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xDD);
    v[c] = _mm512_shuffle_i32x4(e0, f0, 0x88);
    v[8 + c] = _mm512_shuffle_i32x4(e0, f0, 0xDD);
    v[4 + c] = _mm512_shuffle_i32x4(e1, f1, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(e1, f1, 0xDD);
  }
}

// Rows [r_begin, m16) of op(A) -> Ap, whose row 0 is op(A)'s row r_begin (a multiple of 16).
void pack_a(const Bf16GemmOperand& a, int64_t m, int64_t k, int64_t r_begin, int64_t m16, int64_t k32, uint16_t* ap) {
  const int64_t es = a.f32 ? 4 : 2;
  const char* base = static_cast<const char*>(a.data);
  const Source src = source(a);
  if (!a.trans) {
    for (int64_t r = r_begin; r < m16; ++r) {
      uint16_t* dst = ap + (r - r_begin) * k32;
      for (int64_t kk = 0; kk < k32; kk += 32) {
        const __m512i v = r < m ? load32(base + (r * a.ld + kk) * es, src, k - kk) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + kk, v);
      }
    }
    return;
  }
  // A stored k x m: row r of op(A) is column r. Pairs of stored rows interleave into words that
  // run along r; a 16 x 16 word transpose turns them into 16 rows of op(A), 32 values each.
  for (int64_t r0 = r_begin; r0 < m16; r0 += 16) {
    for (int64_t k0 = 0; k0 < k32; k0 += 32) {
      __m512i v[16];
      for (int w = 0; w < 16; ++w) {
        const int64_t kk = k0 + 2 * w;
        const char* row0 = kk < k ? base + (kk * a.ld + r0) * es : nullptr;
        const char* row1 = kk + 1 < k ? base + ((kk + 1) * a.ld + r0) * es : nullptr;
        v[w] = pairs16(row0, row1, src, m - r0);
      }
      transpose16(v);
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(ap + (r0 - r_begin + r) * k32 + k0, v[r]);
    }
  }
}

// op(B) -> Bp (see the top of the file).
void pack_b(const Bf16GemmOperand& b, int64_t n, int64_t k, int64_t n16, int64_t k32, uint32_t* bp) {
  const int64_t es = b.f32 ? 4 : 2;
  const char* base = static_cast<const char*>(b.data);
  const Source src = source(b);
  if (!b.trans) {  // B stored k x n: stored rows 2p and 2p + 1 interleave into word row p
    for (int64_t p = 0; p < k32 / 2; ++p) {
      const int64_t kk = 2 * p;
      for (int64_t j0 = 0; j0 < n16; j0 += 16) {
        const char* row0 = kk < k ? base + (kk * b.ld + j0) * es : nullptr;
        const char* row1 = kk + 1 < k ? base + ((kk + 1) * b.ld + j0) * es : nullptr;
        _mm512_storeu_si512(bp + p * n16 + j0, pairs16(row0, row1, src, n - j0));
      }
    }
    return;
  }
  // B stored n x k: word p of stored row j is already the pair (op(B)[2p][j], op(B)[2p + 1][j]);
  // 16 stored rows of 16 words, transposed, are 16 word rows of Bp.
  for (int64_t j0 = 0; j0 < n16; j0 += 16) {
    for (int64_t k0 = 0; k0 < k32; k0 += 32) {
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        v[j] = j0 + j < n ? load32(base + ((j0 + j) * b.ld + k0) * es, src, k - k0) : _mm512_setzero_si512();
      }
      transpose16(v);
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(bp + (k0 / 2 + p) * n16 + j0, v[p]);
    }
  }
}

}  // namespace

size_t bf16_gemm_scratch_bytes(int64_t m, int64_t n, int64_t k) {
  const int64_t ap = round_up(m, 16) * round_up(k, 32) * 2, bp = round_up(k, 32) * round_up(n, 16) * 2;
  return static_cast<size_t>(round_up(ap, 64) + round_up(bp, 64) + kBlock * kBlock * 4);
}

void bf16_gemm_amx(int64_t m, int64_t n, int64_t k, float alpha, const Bf16GemmOperand& a,
                   const Bf16GemmOperand& b, float beta, float* c, int64_t ldc, void* scratch) {
  if (m <= 0 || n <= 0) return;
  const int64_t m16 = round_up(m, 16), n16 = round_up(n, 16), k32 = round_up(k, 32);
  char* s = static_cast<char*>(scratch);
  uint16_t* ap = reinterpret_cast<uint16_t*>(s);
  uint32_t* bp = reinterpret_cast<uint32_t*>(s + round_up(m16 * k32 * 2, 64));
  float* cs = reinterpret_cast<float*>(s + round_up(m16 * k32 * 2, 64) + round_up(k32 * n16 * 2, 64));
  // A bfloat16 op(A) with whole 32-value k steps is its own A tiles: only a last, partial group of
  // 16 rows (which would read past the matrix) is packed.
  const bool a_in_place = !a.f32 && !a.trans && k % 32 == 0;
  const int64_t packed_from = a_in_place ? m / 16 * 16 : 0;
  pack_a(a, m, k, packed_from, m16, k32, ap);
  pack_b(b, n, k, n16, k32, bp);
  auto a_rows = [&](int64_t r0, int64_t* ld) -> const void* {
    if (r0 < packed_from) {
      *ld = a.ld * 2;
      return static_cast<const uint16_t*>(a.data) + r0 * a.ld;
    }
    *ld = k32 * 2;
    return ap + (r0 - packed_from) * k32;
  };
  // A block wholly inside C with alpha 1 and beta 0 or 1 is stored (or accumulated) by the tiles
  // straight into C; others go through cs and a masked scaling pass.
  const bool direct_ok = alpha == 1.0f && (beta == 0.0f || beta == 1.0f);
  load_tile_config();
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int64_t i0 = 0; i0 < m16; i0 += kBlock) {
    const int mt = m16 - i0 >= 32 ? 2 : 1;
    int64_t lda0 = 0, lda1 = 0;
    const void* a0 = a_rows(i0, &lda0);
    const void* a1 = mt > 1 ? a_rows(i0 + 16, &lda1) : a0;
    for (int64_t j0 = 0; j0 < n16; j0 += kBlock) {
      const int nt = n16 - j0 >= 32 ? 2 : 1;
      const uint32_t* bb = bp + j0;
      const bool direct = direct_ok && i0 + 16 * mt <= m && j0 + 16 * nt <= n;
      float* out = direct ? c + i0 * ldc + j0 : cs;
      const int64_t out_ld = direct ? ldc * 4 : kBlock * 4;
      const bool load_c = direct && beta == 1.0f;
      const AmxOperands ops{a0, lda0, a1, lda1, bb, bb + 16, n16 * 4, k32};
      amx_block(mt, nt, ops, out, out_ld, load_c);
      if (direct) continue;
      // C = alpha * block + beta * C on the block's real rows and columns (beta 0: C unread)
      const int64_t rows = m - i0 < kBlock ? m - i0 : kBlock;
      for (int64_t r = 0; r < rows; ++r) {
        float* crow = c + (i0 + r) * ldc + j0;
        for (int h = 0; h < 2; ++h) {
          const __mmask16 mk = lanes16(n - j0 - 16 * h);
          if (mk == 0) continue;
          __m512 v = _mm512_mul_ps(_mm512_loadu_ps(cs + r * kBlock + 16 * h), va);
          if (beta != 0.0f) v = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk, crow + 16 * h), v);
          _mm512_mask_storeu_ps(crow + 16 * h, mk, v);
        }
      }
    }
  }
  _tile_release();
}

void f32_to_bf16_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, const float* row_scale,
                      uint16_t* dst, int64_t ldd) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF), qnan = _mm512_set1_epi32(0x7FC0);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 s = _mm512_set1_ps(row_scale ? row_scale[r] : 1.0f);
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 mk = lanes16(cols - c);
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, src + r * lds + c), s);
      // bits + 0x7FFF + (bit 16 of bits), then the high half: ties go to the even neighbour
      const __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, bias)), 16);
      h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), qnan);
      _mm256_mask_storeu_epi16(dst + r * ldd + c, mk, _mm512_cvtepi32_epi16(h));
    }
  }
}

void bf16_to_f32_rows(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 mk = lanes16(cols - c);
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, src + r * lds + c));
      _mm512_mask_storeu_ps(dst + r * ldd + c, mk, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
    }
  }
}

}  // namespace fourm_fast
