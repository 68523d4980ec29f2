// See vq_amx.h. Compiled with AMX-TILE, AMX-BF16 and AVX-512 (an *_amx.cpp file); only intrinsics
// and plain loops here, no std:: templates (see small_gemm_avx2.cpp).
//
// Rows are packed once per call into A tiles (16 rows x 32 values, zero past D and past the last
// row); code panels are already in B's pair layout. Blocks of 32 rows x 32 codes (all eight tile
// registers) go to a scratch block, and each row's 32 scores fold into its 16-lane minimum.
#pragma GCC diagnostic ignored "-Wuninitialized"  // see bf16_gemm_amx.cpp
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "amx_tiles.h"
#include "vq_amx.h"

namespace fourm_fast {
namespace {

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

__mmask32 lanes32(int64_t w) {
  return w >= 32 ? ~static_cast<__mmask32>(0) : w <= 0 ? 0 : static_cast<__mmask32>((1u << w) - 1u);
}

}  // namespace

size_t vq_amx_codebook_words(int64_t panels, int64_t D) { return static_cast<size_t>(panels * round_up(D, 32) / 2 * 16); }

void vq_amx_pack_codebook(const float* panels_f32, int64_t panels, int64_t D, uint32_t* out) {
  const int64_t pairs = round_up(D, 32) / 2;
  for (int64_t p = 0; p < panels; ++p) {
    const float* src = panels_f32 + p * D * 16;  // [D][16]
    uint32_t* dst = out + p * pairs * 16;        // [pairs][16]
    for (int64_t q = 0; q < pairs; ++q) {
      const int64_t d = 2 * q;
      // values are exact in bfloat16: their high halves are the bits (no rounding happens)
      const __m512i lo = d < D ? _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(src + d * 16)), 16)
                               : _mm512_setzero_si512();
      const __m512i hi = d + 1 < D ? _mm512_andnot_si512(_mm512_set1_epi32(0xFFFF),
                                                         _mm512_castps_si512(_mm512_loadu_ps(src + (d + 1) * 16)))
                                   : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + q * 16, _mm512_or_si512(lo, hi));
    }
  }
}

bool vq_amx_rows_in_range(const uint16_t* x, int64_t xs0, int64_t rows, int64_t D) {
  const __m512i mag = _mm512_set1_epi16(0x7FFF);
  for (int64_t r = 0; r < rows; ++r) {
    __m512i mx = _mm512_setzero_si512();
    for (int64_t d = 0; d < D; d += 32) {
      mx = _mm512_max_epu16(mx, _mm512_and_si512(_mm512_maskz_loadu_epi16(lanes32(D - d), x + r * xs0 + d), mag));
    }
    // the largest |value| of the row, as bits (bfloat16 magnitudes order as unsigned integers)
    uint16_t lanes[32];
    _mm512_storeu_si512(lanes, mx);
    uint16_t top = 0;
    for (int i = 0; i < 32; ++i) top = lanes[i] > top ? lanes[i] : top;
    if (top != 0 && top < kVqAmxMinMagnitudeBf16) return false;
  }
  return true;
}

bool vq_amx_codes_in_range(const float* panels_f32, int64_t panels, int64_t D) {
  const __m512 mag_min = _mm512_set1_ps(kVqAmxMinMagnitude);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = 0; p < panels; ++p) {
    __m512 mx = zero;  // per code (lane): its largest |value|
    for (int64_t d = 0; d < D; ++d) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(panels_f32 + (p * D + d) * 16)));
    const __mmask16 nonzero = _mm512_cmp_ps_mask(mx, zero, _CMP_NEQ_OQ);
    if (_mm512_mask_cmp_ps_mask(nonzero, mx, mag_min, _CMP_LT_OQ) != 0) return false;
  }
  return true;
}

size_t vq_search_amx_scratch_bytes(int64_t rows, int64_t D) {
  return static_cast<size_t>(round_up(round_up(rows, 32) * round_up(D, 32) * 2, 64) + 32 * 32 * 4);
}

void vq_search_amx(const uint16_t* x, int64_t xs0, int64_t rows, int64_t D, const uint32_t* codes,
                   const float* bias, int64_t panels, float scale, VqLaneBest16* best, void* scratch) {
  if (rows <= 0 || panels <= 0) return;
  const int64_t k32 = round_up(D, 32), m16 = round_up(rows, 16);
  uint16_t* ap = static_cast<uint16_t*>(scratch);
  float* cs = reinterpret_cast<float*>(static_cast<char*>(scratch) + round_up(round_up(rows, 32) * k32 * 2, 64));
  for (int64_t r = 0; r < m16; ++r) {  // rows -> A tiles' row-major layout, zero padded
    for (int64_t kk = 0; kk < k32; kk += 32) {
      const __m512i v = r < rows ? _mm512_maskz_loadu_epi16(lanes32(D - kk), x + r * xs0 + kk) : _mm512_setzero_si512();
      _mm512_storeu_si512(ap + r * k32 + kk, v);
    }
  }
  load_tile_config();
  const int64_t panel_words = k32 / 2 * 16;
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t p = 0; p < panels; p += 2) {  // code panels outer: their tiles stay in L1
    const int nt = panels - p >= 2 ? 2 : 1;
    const uint32_t* b0 = codes + p * panel_words;
    for (int64_t i0 = 0; i0 < m16; i0 += 32) {
      const int mt = m16 - i0 >= 32 ? 2 : 1;
      const AmxOperands ops{ap + i0 * k32, k32 * 2, ap + (i0 + 16) * k32, k32 * 2, b0, b0 + panel_words, 64, k32};
      amx_block(mt, nt, ops, cs, 32 * 4, false);
      const int64_t last = rows - i0 < 32 ? rows - i0 : 32;
      for (int h = 0; h < nt; ++h) {
        const __m512 vb = _mm512_loadu_ps(bias + (p + h) * 16);
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>((p + h) * 16)), lane);
        for (int64_t r = 0; r < last; ++r) {
          VqLaneBest16& b = best[i0 + r];
          const __m512 s = _mm512_fmadd_ps(vs, _mm512_loadu_ps(cs + r * 32 + 16 * h), vb);  // as kernels::vq_score
          const __m512 bs = _mm512_load_ps(b.score);
          const __mmask16 better = _mm512_cmp_ps_mask(s, bs, _CMP_LT_OQ);
          _mm512_store_ps(b.score, _mm512_mask_mov_ps(bs, better, s));
          _mm512_store_si512(b.index, _mm512_mask_mov_epi32(_mm512_load_si512(b.index), better, idx));
        }
      }
    }
  }
  _tile_release();
}

}  // namespace fourm_fast
