// sample_tokens arithmetic, shared by the CPU executor (csrc/cpu/sampling_cpu.cpp) and the CUDA
// executor (csrc/cuda/sampling_cuda.cu). Every value that decides which token is drawn is computed
// here with deterministic operations, and every sum that feeds a decision is an integer sum (so the
// order of a parallel reduction cannot change it): the same seed draws the same token on both.
//
// Per row, with guided logits g (CFG: u + s (c - u)) and m = max g:
//   top-k   keep g >= k-th largest g (ties kept)                      [4M: logits < kth removed]
//   top-p   over the top-k survivors, weights w = exp(g - m) as fixed-point integers q; keep g
//           when the mass of strictly larger values S(g) <= p * Q     [4M: cumsum > p removed,
//           shifted right, so the first token crossing p is kept; ties are kept together here]
//   min-p   keep g - m >= log(min_p)                                   (p_token >= min_p * p_max)
//   draw    inverse CDF over the kept set in token order with fixed-point weights
//           q = floor(exp((g - m) / T) 2^bits): one 64-bit Philox uniform U in [0, Q), the token
//           whose running integer sum first exceeds U. Integer prefix sums are exact, so a
//           parallel scan gives the same token as a serial loop. T == 0: argmax g (first maximum)
//           with probability 1.
//   prob    q_token / Q: exactly the probability the draw used.
// Both threshold searches reduce to one primitive, threshold_select: the smallest value v such
// that the total weight of values strictly above v is <= budget (top-k: weight 1, budget k - 1).
#pragma once

#include "det_math.h"
#include "philox.h"

namespace fourm_fast {
namespace kernels {

enum SampleStatus : int32_t {
  kSampleOk = 0,
  kSampleNaN = 1,           // a NaN logit (or a NaN produced by guidance)
  kSampleNoFinite = 2,      // no finite logit in the row, or a +inf logit
  kSampleBadTemperature = 3,
  kSampleBadTopK = 4,
  kSampleBadTopP = 5,
  kSampleBadMinP = 6,
  kSampleBadCfg = 7,
};

struct SampleParams {
  float temperature;  // >= 0; 0 = argmax
  float top_k;        // 0 = off; integer >= 1; or a fraction of V in (0, 1)
  float top_p;        // (0, 1]; 1 = off
  float min_p;        // [0, 1]; 0 = off
  float cfg_scale;    // finite; used when unconditional logits are given
};

FF_INLINE int32_t validate_sample_params(const SampleParams& p) {
  if (!(p.temperature >= 0.0f) || !is_finite_f32(p.temperature)) return kSampleBadTemperature;
  if (!(p.top_k >= 0.0f) || !is_finite_f32(p.top_k)) return kSampleBadTopK;
  if (p.top_k >= 1.0f && floorf(p.top_k) != p.top_k) return kSampleBadTopK;
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) return kSampleBadTopP;
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) return kSampleBadMinP;
  if (!is_finite_f32(p.cfg_scale)) return kSampleBadCfg;
  return kSampleOk;
}

// 4M's rule: an integer k is min(k, V); a fraction is min(int(k * V), V), at least 1 (where 4M's
// topk(logits, 0) fails; 0 here would turn filtering off); 0 disables.
FF_INLINE int64_t effective_top_k(float top_k, int64_t V) {
  if (top_k <= 0.0f) return 0;
  int64_t k;
  if (top_k < 1.0f) {
    k = static_cast<int64_t>(static_cast<double>(top_k) * static_cast<double>(V));
    k = k > 1 ? k : 1;
  } else {
    // (compared as floats first: a count beyond int64's range, e.g. 1e30, has no defined cast)
    if (static_cast<double>(top_k) >= static_cast<double>(V)) return V;
    k = static_cast<int64_t>(top_k);
  }
  return k < V ? k : V;
}

// CFG: u + s (c - u). A token that either branch rules out (-inf) stays ruled out. Otherwise scale
// 1 gives the conditional logit and scale 0 the unconditional one exactly (the formula rounds
// c - u, which can break a tie of c or overflow for finite c and u), as long as the other branch
// is finite: a NaN or +inf there still reaches the result, which the row check then rejects.
FF_INLINE float guided_logit(float cond, float uncond, float scale) {
  if (cond == -positive_infinity_f32() || uncond == -positive_infinity_f32()) {
    return -positive_infinity_f32();
  }
  if (scale == 1.0f && is_finite_f32(uncond)) return cond;
  if (scale == 0.0f && is_finite_f32(cond)) return uncond;
  return fmaf(scale, ff_sub(cond, uncond), uncond);
}

// Monotone map of a float onto uint32 (larger float -> larger key); -inf maps below every finite.
FF_INLINE uint32_t ordered_key(float v) {
  const uint32_t b = float_bits(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

FF_INLINE float key_to_float(uint32_t key) {
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Fixed-point scale for the top-p weights: q = floor(w * 2^bits) with w in [0, 1], chosen so
// the row's total fits 53 bits and p * Q is computed exactly enough in double.
FF_INLINE int mass_scale_bits(int64_t V) {
  int log2v = 0;
  while ((int64_t{1} << log2v) < V) ++log2v;
  return 52 - log2v;
}

// floor(w * 2^bits) for w = ff_exp(...) in [0, 1], formed with integer shifts of w's significand
// (no float -> double -> uint64 conversions, which are slow on the GPU's conversion unit). Exact:
// w * 2^bits is a 24-bit integer scaled by a power of two, and the shift floors it.
FF_INLINE uint64_t mass_weight(float w, int bits) {
  const uint32_t u = float_bits(w);
  const uint32_t biased = (u >> 23) & 0xffu;
  const uint64_t frac = u & 0x7fffffu;
  const uint64_t mant = biased != 0u ? (frac | 0x800000u) : frac;
  const int shift = (biased != 0u ? static_cast<int>(biased) - 150 : -149) + bits;
  // Branch-free so CPU loops vectorise: w <= 1 keeps shift <= 29, and a right shift of 64 or more
  // gives 0.
  const uint64_t left = mant << (shift > 0 ? shift : 0);
  const int rs = shift < 0 ? -shift : 0;
  const uint64_t right = rs < 64 ? (mant >> rs) : uint64_t{0};
  return shift >= 0 ? left : right;
}

// floor(p * Q): weights strictly above the cut may total at most this.
FF_INLINE uint64_t top_p_budget(float top_p, uint64_t total) {
  return static_cast<uint64_t>(static_cast<double>(top_p) * static_cast<double>(total));
}

// min-p on logits: p_t >= min_p p_max  <=>  g_t - m >= log(min_p).
FF_INLINE float min_p_logit_gap(float min_p) { return min_p > 0.0f ? ff_log(min_p) : -positive_infinity_f32(); }

// Tempered, max-shifted logit of a kept token.
FF_INLINE float tempered(float g, float m, float temperature) { return ff_div(ff_sub(g, m), temperature); }

// A uniform integer in [0, total) from 64 random bits: floor(bits * total / 2^64).
FF_INLINE uint64_t uniform_below(uint64_t total, uint32_t lo, uint32_t hi) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 32) | lo;
#if defined(__CUDA_ARCH__)
  return __umul64hi(bits, total);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * total) >> 64);
#endif
}

// The draw's random integer for a row (the first two words of the row's Philox block 0).
FF_INLINE uint64_t draw_target(uint64_t total, uint64_t seed, uint64_t offset, uint32_t row) {
  const Philox4 r = philox_block(seed, offset, row, 0u);
  return uniform_below(total, r.v[0], r.v[1]);
}

// Probability of the drawn token from fixed-point weights (deterministic division in double).
FF_INLINE float drawn_probability(uint64_t q_token, uint64_t q_total) {
  if (q_total == 0) return 1.0f;
  return static_cast<float>(static_cast<double>(q_token) / static_cast<double>(q_total));
}

}  // namespace kernels
}  // namespace fourm_fast
