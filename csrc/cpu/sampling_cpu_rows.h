// The per-row work of the CPU sample_tokens executor, compiled three times: for the baseline ISA
// (sampling_cpu.cpp), with AVX2+FMA (sampling_cpu_avx2.cpp), where fmaf becomes one instruction
// instead of a libm call, and with AVX-512 (sampling_cpu_avx512.cpp, 16-lane loops). FF_ROWS_NS
// names the namespace of each copy.
//
// Each row is read once into a float buffer (guided when CFG is on); thresholds come from radix
// selection over ordered keys (no sort); the draw is the inverse CDF over fixed-point weights.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../kernels/sampling_math.h"
#include "threshold_select.h"

#ifndef FF_ROWS_NS
#error "define FF_ROWS_NS before including sampling_cpu_rows.h"
#endif

namespace fourm_fast {
namespace FF_ROWS_NS {

using namespace kernels;

struct RowScratch {
  std::vector<float> g;
  std::vector<float> e;  // per-token exp weights before fixed-point conversion
  std::vector<uint32_t> keys;
  std::vector<uint64_t> weights;
  std::vector<uint64_t> block_sums;
};

constexpr int64_t kDrawBlock = 256;

// q[t] = mass_weight(e[t], bits), 0 where e[t] is negative (not a candidate); returns the sum.
// GCC does not vectorise the 64-bit variable shifts of mass_weight, so the AVX2 copy spells them
// out: srlv(sllv(mant, max(shift, 0)), max(-shift, 0)) is mass_weight exactly (a count of 64 or
// more gives 0, as the scalar code does).
inline uint64_t fixed_point_weights(const float* e, int64_t n, int bits, uint64_t* q) {
  int64_t t = 0;
  uint64_t sum = 0;
#if defined(__AVX2__)
  const __m256i exp_mask = _mm256_set1_epi32(0xff), frac_mask = _mm256_set1_epi32(0x7fffff);
  const __m256i hidden = _mm256_set1_epi32(0x800000), zero = _mm256_setzero_si256();
  const __m256i bias_norm = _mm256_set1_epi32(bits - 150), bias_sub = _mm256_set1_epi32(bits - 149);
  __m256i acc = zero;
  for (; t + 8 <= n; t += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + t));
    const __m256i negative = _mm256_srai_epi32(u, 31);
    const __m256i biased = _mm256_and_si256(_mm256_srli_epi32(u, 23), exp_mask);
    const __m256i normal = _mm256_xor_si256(_mm256_cmpeq_epi32(biased, zero), _mm256_set1_epi32(-1));
    const __m256i mant = _mm256_or_si256(_mm256_and_si256(u, frac_mask), _mm256_and_si256(normal, hidden));
    const __m256i shift = _mm256_blendv_epi8(bias_sub, _mm256_add_epi32(biased, bias_norm), normal);
    const __m256i lcount = _mm256_max_epi32(shift, zero);
    const __m256i rcount = _mm256_max_epi32(_mm256_sub_epi32(zero, shift), zero);
    const __m256i keep = _mm256_xor_si256(negative, _mm256_set1_epi32(-1));
    const __m256i mant_kept = _mm256_and_si256(mant, keep);
    for (int half = 0; half < 2; ++half) {
      const __m128i m32 = half ? _mm256_extracti128_si256(mant_kept, 1) : _mm256_castsi256_si128(mant_kept);
      const __m128i l32 = half ? _mm256_extracti128_si256(lcount, 1) : _mm256_castsi256_si128(lcount);
      const __m128i r32 = half ? _mm256_extracti128_si256(rcount, 1) : _mm256_castsi256_si128(rcount);
      const __m256i w = _mm256_srlv_epi64(_mm256_sllv_epi64(_mm256_cvtepu32_epi64(m32), _mm256_cvtepu32_epi64(l32)),
                                          _mm256_cvtepu32_epi64(r32));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + t + 4 * half), w);
      acc = _mm256_add_epi64(acc, w);
    }
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; t < n; ++t) {
    q[t] = e[t] < 0.0f ? uint64_t{0} : mass_weight(e[t], bits);
    sum += q[t];
  }
  return sum;
}

struct RowResult {
  int64_t token;
  float prob;
};

// Scans a loaded row: NaN / +inf flags and the max, on the ordered integer keys so the loop
// vectorises (a float max with NaN semantics does not). NaN rows raise, so the key order of NaN
// never matters; +0 ranks above -0, which changes nothing downstream (g - m and g == m agree).
inline int32_t scan_row(const float* g, int64_t V, float* m_out) {
  uint32_t kmax = 0, nan = 0, pos_inf = 0;
  for (int64_t t = 0; t < V; ++t) {
    const uint32_t b = float_bits(g[t]);
    const uint32_t mag = b & 0x7fffffffu;
    nan |= static_cast<uint32_t>(mag > 0x7f800000u);
    pos_inf |= static_cast<uint32_t>(b == 0x7f800000u);
    const uint32_t k = ordered_key(g[t]);
    kmax = k > kmax ? k : kmax;
  }
  const float m = key_to_float(kmax);
  *m_out = m;
  if (nan) return kSampleNaN;
  if (pos_inf || m == -positive_infinity_f32()) return kSampleNoFinite;
  return kSampleOk;
}

// Reads and guides one row into g; returns the status and the row max through m. Contiguous rows
// get their own loops so the conversion and guidance vectorise.
template <typename scalar_t>
int32_t load_row(const scalar_t* cond, int64_t cs1, const scalar_t* uncond, int64_t us1, int64_t V,
                 float cfg_scale, float* g, float* m_out) {
  const bool contiguous = cs1 == 1 && (uncond == nullptr || us1 == 1);
  if (uncond != nullptr) {
    if (contiguous) {
      for (int64_t t = 0; t < V; ++t) {
        g[t] = guided_logit(static_cast<float>(cond[t]), static_cast<float>(uncond[t]), cfg_scale);
      }
    } else {
      for (int64_t t = 0; t < V; ++t) {
        g[t] = guided_logit(static_cast<float>(cond[t * cs1]), static_cast<float>(uncond[t * us1]), cfg_scale);
      }
    }
  } else if (contiguous) {
    for (int64_t t = 0; t < V; ++t) g[t] = static_cast<float>(cond[t]);
  } else {
    for (int64_t t = 0; t < V; ++t) g[t] = static_cast<float>(cond[t * cs1]);
  }
  return scan_row(g, V, m_out);
}

// The kept set is {t : g[t] >= cut, g[t] finite, g[t] - m >= gap}; returns cut. When top-p ran,
// s.e[t] holds exp(g[t] - m) for every finite g[t] >= the top-k cut (and *e_valid is set).
inline float filter_cut(const float* g, int64_t V, float m, const SampleParams& p, RowScratch& s, bool* e_valid) {
  *e_valid = false;
  float cut = -positive_infinity_f32();
  const int64_t k = effective_top_k(p.top_k, V);
  s.keys.resize(static_cast<size_t>(V));
  s.weights.resize(static_cast<size_t>(V));
  uint32_t* keys = s.keys.data();
  uint64_t* weights = s.weights.data();
  if (k > 0 && k < V) {
    // -inf tokens stay in the selection: when k < (number of finite tokens) the k-th largest is
    // finite and every -inf lies below it. Without compaction the loop vectorises.
    int64_t finite = 0;
    for (int64_t t = 0; t < V; ++t) {
      keys[t] = ordered_key(g[t]);
      finite += g[t] != -positive_infinity_f32();
    }
    if (k < finite) cut = key_to_float(threshold_select(keys, nullptr, V, static_cast<uint64_t>(k - 1)));
  }
  if (p.top_p < 1.0f) {
    const int bits = mass_scale_bits(V);
    s.e.resize(static_cast<size_t>(V));
    float* e = s.e.data();
    for (int64_t t = 0; t < V; ++t) {  // branch-free: vectorises
      const float gt = g[t];
      const bool cand = (gt >= cut) & (gt != -positive_infinity_f32());
      const float et = ff_exp(ff_sub(gt, m));
      e[t] = cand ? et : -1.0f;
    }
    // Tokens outside the top-k set take part with weight 0: every one of them lies below all
    // candidates, whose whole weight exceeds the budget, so none can become the cut. This keeps
    // the loop free of compaction (it vectorises).
    for (int64_t t = 0; t < V; ++t) keys[t] = ordered_key(g[t]);
    const uint64_t total = fixed_point_weights(e, V, bits, weights);
    const int64_t n = V;
    const uint32_t key = threshold_select(keys, weights, n, top_p_budget(p.top_p, total));
    cut = std::max(cut, key_to_float(key));
    *e_valid = true;
  }
  return cut;
}

inline RowResult draw_row(const float* g, int64_t V, float m, const SampleParams& p, uint64_t seed,
                          uint64_t offset, uint32_t row, RowScratch& s) {
  bool e_valid = false;
  const float cut = filter_cut(g, V, m, p, s, &e_valid);
  const float gap = min_p_logit_gap(p.min_p);
  if (p.temperature == 0.0f) {
    for (int64_t t = 0; t < V; ++t) {
      if (g[t] == m) return {t, 1.0f};  // the first maximum is always kept
    }
  }
  const int bits = mass_scale_bits(V);
  s.e.resize(static_cast<size_t>(V));
  s.weights.resize(static_cast<size_t>(V));
  float* e = s.e.data();
  uint64_t* w = s.weights.data();
  const float temperature = p.temperature;
  if (e_valid && temperature == 1.0f) {
    // (g - m) / 1 == g - m exactly: reuse the top-p pass's exp values.
    for (int64_t t = 0; t < V; ++t) {
      const float gt = g[t];
      const bool kept = (gt >= cut) & (gt != -positive_infinity_f32()) & (ff_sub(gt, m) >= gap);
      e[t] = kept ? e[t] : 0.0f;
    }
  } else {
    for (int64_t t = 0; t < V; ++t) {  // branch-free (& not &&, both arms computed): vectorises
      const float gt = g[t];
      const bool kept = (gt >= cut) & (gt != -positive_infinity_f32()) & (ff_sub(gt, m) >= gap);
      const float et = ff_exp(tempered(gt, m, temperature));
      e[t] = kept ? et : 0.0f;
    }
  }
  // Fixed-point weights with per-block sums, so the inverse-CDF walk skips whole blocks.
  const int64_t num_blocks = (V + kDrawBlock - 1) / kDrawBlock;
  s.block_sums.resize(static_cast<size_t>(num_blocks));
  uint64_t* block_sums = s.block_sums.data();
  uint64_t total = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t t1 = std::min(V, (b + 1) * kDrawBlock);
    const uint64_t sum = fixed_point_weights(e + b * kDrawBlock, t1 - b * kDrawBlock, bits, w + b * kDrawBlock);
    block_sums[b] = sum;
    total += sum;
  }
  // total >= 2^bits: the first maximum is kept with weight exp(0) = 1.
  const uint64_t target = draw_target(total, seed, offset, row);
  uint64_t running = 0;
  int64_t b = 0;
  while (running + block_sums[b] <= target) running += block_sums[b++];
  for (int64_t t = b * kDrawBlock; t < V; ++t) {
    running += w[t];
    if (running > target) return {t, drawn_probability(w[t], total)};
  }
  return {-1, quiet_nan_f32()};  // unreachable: running reaches total > target
}

// Rows [r0, r1): tokens/probs/status written per row.
template <typename scalar_t>
void sample_rows(const scalar_t* cond, int64_t cs0, int64_t cs1, const scalar_t* uncond, int64_t us0, int64_t us1,
                 int64_t V, const SampleParams* params, int64_t params_stride, uint64_t seed, uint64_t offset,
                 int64_t r0, int64_t r1, int64_t* tokens, float* probs, int32_t* status) {
  RowScratch scratch;
  scratch.g.resize(static_cast<size_t>(V));
  for (int64_t r = r0; r < r1; ++r) {
    const SampleParams p = params[r * params_stride];
    int32_t st = validate_sample_params(p);
    float m = 0.0f;
    if (st == kSampleOk) {
      st = load_row(cond + r * cs0, cs1, uncond ? uncond + r * us0 : nullptr, us1, V, p.cfg_scale,
                    scratch.g.data(), &m);
    }
    status[r] = st;
    if (st != kSampleOk) {
      tokens[r] = -1;
      probs[r] = quiet_nan_f32();
      continue;
    }
    const RowResult res = draw_row(scratch.g.data(), V, m, p, seed, offset, static_cast<uint32_t>(r), scratch);
    tokens[r] = res.token;
    probs[r] = res.prob;
  }
}

}  // namespace FF_ROWS_NS
}  // namespace fourm_fast
