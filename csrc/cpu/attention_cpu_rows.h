// Row passes of the CPU masked_attention executor, compiled three times: for the baseline ISA
// (attention_cpu_rows.cpp, 4-float SSE lanes), with AVX2+FMA (attention_cpu_rows_avx2.cpp, 8-float
// lanes) and with AVX-512 (attention_cpu_rows_avx512.cpp, 16-float lanes). FF_ATTN_ROWS_NS names
// each copy's namespace.
//
// The exponentials are computed here (exp_lanes) in the same pass that masks and sums, instead of
// a separate vectorised ATen exp over the tile: MKL's exp measured 1.3-1.5 ns per float on the
// 2-core EPYC (a 128 x 128 tile: about 23 us, 40% of the forward's two tile products), and the
// extra passes over the tile (shift, exp, sum) each re-read it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../kernels/attention_math.h"
#include "attention_cpu_rows_dispatch.h"

#ifndef FF_ATTN_ROWS_NS
#error "define FF_ATTN_ROWS_NS before including attention_cpu_rows.h"
#endif

namespace fourm_fast {
namespace FF_ATTN_ROWS_NS {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // without AVX, GCC lowers compares and selects of 8-float vectors to scalars
#endif
typedef float VF __attribute__((vector_size(4 * kLanes)));
typedef int32_t VI __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VU __attribute__((vector_size(4 * kLanes)));

static inline VF splat(float x) { return VF{} + x; }

static inline VF load(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);  // unaligned
  return v;
}
static inline void store(float* p, VF v) { std::memcpy(p, &v, sizeof v); }

// The first n (< kLanes) floats of p, the other lanes set to fill; and the matching store. AVX-512
// has masked loads and stores for this; elsewhere a variable-length memcpy (which became a chain
// of branches, the cost of a whole row pass on rows of a dozen keys).
#if defined(__AVX512F__)
static inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
static inline VF load_part(const float* p, int64_t n, float fill) {
  return reinterpret_cast<VF>(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p));
}
static inline void store_part(float* p, VF v, int64_t n) {
  _mm512_mask_storeu_ps(p, first_lanes(n), reinterpret_cast<__m512>(v));
}
#else
static inline VF load_part(const float* p, int64_t n, float fill) {
  VF v = splat(fill);
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}
static inline void store_part(float* p, VF v, int64_t n) { std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float)); }
#endif

// Metadata lanes; a null array (metadata kind absent) or the lanes past n read as 0 (hidden, as
// valid_lanes is 0 there).
static inline VI load_lanes(const int32_t* p, int64_t n) {
#if defined(__AVX512F__)
  if (p == nullptr) return VI{};
  return reinterpret_cast<VI>(_mm512_maskz_loadu_epi32(first_lanes(n), p));
#else
  VI v = {};
  if (p != nullptr) std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(int32_t));
  return v;
#endif
}

// a * b + c, one rounding where the ISA has FMA.
static inline VF madd(VF a, VF b, VF c) {
#if defined(__AVX512F__)
  return reinterpret_cast<VF>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                              reinterpret_cast<__m512>(c)));
#elif defined(__FMA__) && defined(__AVX2__)
  return reinterpret_cast<VF>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                              reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// Lane reductions as a tree (halves, then quarters, ...): a serial chain over 16 lanes cost about
// as much per row as the row's vector work at 128 keys (perf on the AVX-512 copy). AVX-512 keeps
// the tree in registers (same pairing); elsewhere it goes through a small array.
#if defined(__AVX512F__)
// 16 lanes -> 8 -> 4 -> 2 -> 1 with op. The halves are split by memcpy: GCC 12's
// _mm512_reduce_* and _mm512_extractf64x4_pd raise -Wmaybe-uninitialized in its own header.
template <typename Op256, typename Op128>
static inline float reduce16(VF v, Op256 op256, Op128 op128) {
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const __m256 h = op256(lo, hi);
  __m128 q = op128(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = op128(q, _mm_movehl_ps(q, q));
  q = op128(q, _mm_shuffle_ps(q, q, 1));
  return _mm_cvtss_f32(q);
}
#else
template <typename Op>
static inline float tree_reduce(VF v, Op op) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) t[l] = op(t[l], t[l + w]);
  }
  return t[0];
}
#endif

static inline float hsum(VF v) {
#if defined(__AVX512F__)
  return reduce16(v, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); }, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
#else
  return tree_reduce(v, [](float a, float b) { return a + b; });
#endif
}

// a > b ? a : b at every level (max_ps has exactly this rule, NaN included)
static inline float hmax(VF v) {
#if defined(__AVX512F__)
  return reduce16(v, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
#else
  return tree_reduce(v, [](float a, float b) { return a > b ? a : b; });
#endif
}

// e^x per lane: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2, e^r by its degree-7
// Taylor polynomial (truncation below 5e-9 relative), 2^n applied as two powers of two so that
// results in the subnormal range round once, in the last multiply. Results underflow to exactly 0
// below about -104 (inputs are clamped to [-112, 89]; e^-inf = 0 for masked scores) and overflow
// to +inf above about 88.72; NaN stays NaN. tests/test_attention_rows.py measures the error
// against float64 on every 997th float32 bit pattern whose e^x is finite and nonzero (at most
// 2 ulp; 0.92 with FMA and 1.2 without on a denser sample).
static inline VF exp_lanes(VF x) {
  const VF lo = splat(-112.0f), hi = splat(89.0f);
  x = x < lo ? lo : x;  // comparisons with NaN are false: NaN passes both clamps
  x = x > hi ? hi : x;
  const VF shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VF n = madd(x, splat(1.44269504089f), shifter) - shifter;
  // ln 2 in two parts: n * 0.693359375 is exact for |n| < 2^15, the rest is the correction.
  VF r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440054690583e-4f);
  VF p = splat(1.0f / 5040.0f);
  p = madd(p, r, splat(1.0f / 720.0f));
  p = madd(p, r, splat(1.0f / 120.0f));
  p = madd(p, r, splat(1.0f / 24.0f));
  p = madd(p, r, splat(1.0f / 6.0f));
  p = madd(p, r, splat(0.5f));
  p = madd(p, r, splat(1.0f));
  p = madd(p, r, splat(1.0f));
  const VI ni = __builtin_convertvector(n, VI);  // n in [-162, 128]: each half's power is normal
  const VI half = ni >> 1;
  const VF s1 = reinterpret_cast<VF>(reinterpret_cast<VU>(half + 127) << 23);
  const VF s2 = reinterpret_cast<VF>(reinterpret_cast<VU>(ni - half + 127) << 23);
  return p * s1 * s2;
}

// x[0:n] = e^x in place (the test hook _C._cpu_exp measures exp_lanes through it).
static void exp_inplace(float* x, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(x + c, exp_lanes(load(x + c)));
  if (c < n) store_part(x + c, exp_lanes(load_part(x + c, n - c, 0.0f)), n - c);
}

template <bool kSeg, bool kRank>
static inline VI visible(const AttnRowTile& t, const kernels::AttnQueryMeta& qm, int64_t c, int64_t n) {
  VI valid, seg = {}, rank = {};
  if (n == kLanes) {
    std::memcpy(&valid, t.valid_lanes + c, sizeof valid);
    if (kSeg) std::memcpy(&seg, t.k_segment + c, sizeof seg);
    if (kRank) std::memcpy(&rank, t.k_rank + c, sizeof rank);
  } else {
    valid = load_lanes(t.valid_lanes + c, n);
    if (kSeg) seg = load_lanes(t.k_segment + c, n);
    if (kRank) rank = load_lanes(t.k_rank + c, n);
  }
  return kernels::attn_visible_lanes(valid, seg, rank, qm, kSeg, kRank);
}

template <bool kSeg, bool kRank>
static inline kernels::AttnQueryMeta query(const AttnRowTile& t, int64_t r) {
  return {kSeg ? t.q_segment[r] : 0, kRank ? t.q_limit[r] : 0};
}

template <bool kSeg, bool kRank>
void softmax_fwd(const AttnRowTile& t) {
  const VF hidden = splat(-INFINITY);
  const VF scale = splat(t.scale);
  const int64_t nk = t.keys;
  for (int64_t r = 0; r < t.rows; ++r) {
    float* row = t.s + r * nk;
    const kernels::AttnQueryMeta qm = query<kSeg, kRank>(t, r);
    // Pass 1: scale, mask (hidden scores are replaced, never combined: a non-finite one cannot
    // leak), row max.
    VF mx = hidden;
    for (int64_t c = 0; c < nk; c += kLanes) {
      const int64_t n = nk - c < kLanes ? nk - c : kLanes;
      VF x = n == kLanes ? load(row + c) : load_part(row + c, n, 0.0f);
      x = visible<kSeg, kRank>(t, qm, c, n) != 0 ? x * scale : hidden;
      mx = mx > x ? mx : x;
      n == kLanes ? store(row + c, x) : store_part(row + c, x, n);
    }
    const float m = hmax(mx);
    const float shift = m == -INFINITY ? 0.0f : m;  // a row that sees nothing: exp(-inf - 0) = 0
    // Pass 2: exp(x - max) and the row sum.
    const VF sv = splat(shift);
    VF acc0 = VF{}, acc1 = VF{};
    int64_t c = 0;
    for (; c + 2 * kLanes <= nk; c += 2 * kLanes) {  // two sums: the adds do not wait on each other
      const VF e0 = exp_lanes(load(row + c) - sv), e1 = exp_lanes(load(row + c + kLanes) - sv);
      store(row + c, e0);
      store(row + c + kLanes, e1);
      acc0 += e0;
      acc1 += e1;
    }
    for (; c < nk; c += kLanes) {
      const int64_t n = nk - c < kLanes ? nk - c : kLanes;
      const VF e = exp_lanes((n == kLanes ? load(row + c) : load_part(row + c, n, -INFINITY)) - sv);
      n == kLanes ? store(row + c, e) : store_part(row + c, e, n);
      acc0 += e;
    }
    const float sum = hsum(acc0 + acc1);
    t.lse[r] = kernels::attn_lse(shift, sum);  // sum 0: -inf
    t.row_sums[r] = sum;
  }
}

template <bool kSeg, bool kRank>
void probs_bwd(const AttnRowTile& t) {
  const VF scale = splat(t.scale), zero = VF{};
  const int64_t nk = t.keys;
  for (int64_t r = 0; r < t.rows; ++r) {
    float* row = t.s + r * nk;
    if (t.lse[r] == -INFINITY) {  // a row that saw nothing: probabilities 0
      std::memset(row, 0, static_cast<size_t>(nk) * sizeof(float));
      continue;
    }
    const kernels::AttnQueryMeta qm = query<kSeg, kRank>(t, r);
    const VF lse = splat(t.lse[r]);
    for (int64_t c = 0; c < nk; c += kLanes) {
      const int64_t n = nk - c < kLanes ? nk - c : kLanes;
      const VF x = n == kLanes ? load(row + c) : load_part(row + c, n, 0.0f);
      const VF p = visible<kSeg, kRank>(t, qm, c, n) != 0 ? exp_lanes(x * scale - lse) : zero;  // attn_prob
      n == kLanes ? store(row + c, p) : store_part(row + c, p, n);
    }
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
  VF acc = VF{};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) acc = madd(load(a + d), load(b + d), acc);
  float tail = 0.0f;
  for (; d < n; ++d) tail += a[d] * b[d];
  return hsum(acc) + tail;
}

static void dscores(float* ds, const float* p, const float* g, int64_t ldg, const float* o, int64_t ldo, int64_t rows,
                    int64_t keys, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const float delta = dot(g + r * ldg, o + r * ldo, D);  // sum_d dO * O
    float* dsr = ds + r * keys;
    const float* pr = p + r * keys;
    int64_t c = 0;
    for (; c + kLanes <= keys; c += kLanes) store(dsr + c, kernels::attn_dscore(load(pr + c), load(dsr + c), delta));
    for (; c < keys; ++c) dsr[c] = kernels::attn_dscore(pr[c], dsr[c], delta);
  }
}

// The metadata kinds as template arguments: absent kinds compile out of the inner loops.
#define FF_ATTN_ROWS_BY_KIND(fn)                                                    \
  static void fn##_any(const AttnRowTile& t) {                                      \
    const bool seg = t.k_segment != nullptr, rank = t.k_rank != nullptr;            \
    if (seg) {                                                                      \
      rank ? fn<true, true>(t) : fn<true, false>(t);                                \
    } else {                                                                        \
      rank ? fn<false, true>(t) : fn<false, false>(t);                              \
    }                                                                               \
  }
FF_ATTN_ROWS_BY_KIND(softmax_fwd)
FF_ATTN_ROWS_BY_KIND(probs_bwd)
#undef FF_ATTN_ROWS_BY_KIND

}  // namespace FF_ATTN_ROWS_NS
}  // namespace fourm_fast
