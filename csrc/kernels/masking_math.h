// The training-time token-budget sampler (4M's multimodal masking), one sample at a time, shared by
// the CPU executor (parallel over samples) and the CUDA executor (one thread per sample).
//
// Every random number comes from a sequential Philox stream per (seed, offset, sample, domain), so
// a sample's draws depend on nothing but its own index: the same seed gives the same budgets and
// the same token choices on CPU and GPU, whatever the batch split or thread count.
//
// Per sample (mirroring ml-4m's UnifiedMasking):
//   component c  ~ weights (uniform when none);  N_in, N_tg ~ uniform integers in their ranges
//   input  budget: floor(Dir(alpha_in[c]) * N_in), the remainder handed out one token at a time to
//                  the argmax of fresh Dirichlet draws, then capped by each modality's size
//   target budget: the same with alpha_tg[c] and N_tg; an image modality's cap is its size minus
//                  its input budget (inputs and targets are disjoint), a sequence's is its size
//   image tokens : a uniformly random ordered subset (partial Fisher-Yates): the first b_in
//                  positions are inputs, the next b_tg targets
//   sequences    : span masking (see span_mask_sample)
#pragma once

#include "common.h"
#include "det_math.h"
#include "philox.h"
#include "sampling_math.h"

namespace fourm_fast {
namespace kernels {

constexpr int kMaskMaxModalities = 64;
constexpr int kMaskMaxComponents = 16;
// Smallest positive Dirichlet alpha: log(U) / alpha stays finite (|log U| <= 17 for U >= 2^-24).
constexpr float kMinPositiveAlpha = 1e-30f;
// Source code of a padding slot in a span-masked sequence buffer; sentinel s (s >= 1) is -s and
// token j of the original sequence is j.
constexpr int32_t kSpanPad = -2147483647 - 1;

// Stream domains (high byte of the Philox block counter), so the streams of one sample never meet.
constexpr uint32_t kDomainBudget = 1;
constexpr uint32_t kDomainSelect = 64;   // + modality
constexpr uint32_t kDomainSpan = 128;    // + modality

// Four words per Philox call, consumed in order.
struct PhiloxStream {
  uint64_t seed;
  uint64_t offset;
  uint32_t row;
  uint32_t block;
  uint32_t words[4];
  int used;
};

FF_INLINE PhiloxStream make_stream(uint64_t seed, uint64_t offset, uint32_t sample, uint32_t domain) {
  PhiloxStream s;
  s.seed = seed;
  s.offset = offset;
  s.row = sample;
  s.block = domain << 24;  // 2^24 blocks (64 Mi words) per domain
  s.used = 4;
  for (int i = 0; i < 4; ++i) s.words[i] = 0;
  return s;
}

FF_INLINE uint32_t next_word(PhiloxStream& s) {
  if (s.used == 4) {
    const Philox4 r = philox_block(s.seed, s.offset, s.row, s.block++);
    for (int i = 0; i < 4; ++i) s.words[i] = r.v[i];
    s.used = 0;
  }
  return s.words[s.used++];
}

// Uniform integer in [0, n) for n >= 1 (64 random bits, multiply-high: bias below 2^-32).
FF_INLINE uint64_t next_below(PhiloxStream& s, uint64_t n) {
  const uint32_t lo = next_word(s);
  const uint32_t hi = next_word(s);
  return uniform_below(n, lo, hi);
}

// Uniform integer in [0, n) for 1 <= n < 2^24 from one word (bias below n / 2^32 <= 2^-8 ulp of
// a probability: far below any test's resolution); used where draws are many.
FF_INLINE uint32_t next_below_small(PhiloxStream& s, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(next_word(s)) * n) >> 32);
}

FF_INLINE float next_open01(PhiloxStream& s) { return uniform_open01(next_word(s)); }

// Standard normal by Marsaglia's polar method: log and sqrt only, no trigonometry.
FF_INLINE float next_normal(PhiloxStream& s) {
  for (;;) {
    const float u = ff_sub(ff_mul(2.0f, next_open01(s)), 1.0f);
    const float v = ff_sub(ff_mul(2.0f, next_open01(s)), 1.0f);
    const float r2 = ff_add(ff_mul(u, u), ff_mul(v, v));
    if (r2 >= 1.0f || r2 == 0.0f) continue;
    return ff_mul(u, ff_sqrt(ff_div(ff_mul(-2.0f, ff_log(r2)), r2)));
  }
}

// log of a Gamma(alpha, 1) draw (Marsaglia and Tsang 2000). For alpha < 1 the alpha + 1 draw is
// scaled by U^(1/alpha), added in log space so tiny alphas give very negative logs instead of
// underflowing to 0. alpha == 0 gives -inf (the modality is never picked).
FF_INLINE float next_log_gamma(PhiloxStream& s, float alpha) {
  if (!(alpha > 0.0f)) return -positive_infinity_f32();
  const bool boost = alpha < 1.0f;
  const float a = boost ? ff_add(alpha, 1.0f) : alpha;
  const float d = ff_sub(a, 1.0f / 3.0f);
  const float c = ff_div(1.0f, ff_sqrt(ff_mul(9.0f, d)));
  float dv;
  for (;;) {
    const float x = next_normal(s);
    const float t = ff_add(1.0f, ff_mul(c, x));
    if (t <= 0.0f) continue;
    const float v = ff_mul(ff_mul(t, t), t);
    const float u = next_open01(s);
    const float x2 = ff_mul(x, x);
    // Squeeze first (no logs), then the exact acceptance test.
    if (u < ff_sub(1.0f, ff_mul(0.0331f, ff_mul(x2, x2)))) {
      dv = ff_mul(d, v);
      break;
    }
    const float rhs = ff_add(ff_sub(ff_add(ff_mul(0.5f, x2), d), ff_mul(d, v)), ff_mul(d, ff_log(v)));
    if (ff_log(u) < rhs) {
      dv = ff_mul(d, v);
      break;
    }
  }
  float lg = ff_log(dv);
  if (boost) lg = ff_add(lg, ff_div(ff_log(next_open01(s)), alpha));
  return lg;
}

// One Dirichlet(alpha) draw over M modalities as log-gammas (unnormalised): the normalised vector
// is exp(lg - max) / sum. Returns the argmax (first on ties); -1 when every alpha is 0.
FF_INLINE int dirichlet_log(PhiloxStream& s, const float* alpha, int M, float* lg) {
  int best = -1;
  float best_v = -positive_infinity_f32();
  for (int m = 0; m < M; ++m) {
    lg[m] = next_log_gamma(s, alpha[m]);
    if (lg[m] > best_v) {
      best_v = lg[m];
      best = m;
    }
  }
  return best;
}

// 4M's apportioning of `total` tokens: floor(D * total) per modality, then each missing token to
// the argmax of a fresh Dirichlet draw; then the per-modality cap. lg is scratch of size M.
FF_INLINE void apportion(PhiloxStream& s, const float* alpha, int M, int32_t total, const int32_t* cap,
                         float* lg, int32_t* out) {
  const int best = dirichlet_log(s, alpha, M, lg);
  const float mx = lg[best];
  float sum = 0.0f;
  for (int m = 0; m < M; ++m) {
    lg[m] = ff_exp(ff_sub(lg[m], mx));
    sum = ff_add(sum, lg[m]);
  }
  const float total_f = static_cast<float>(total);
  int32_t assigned = 0;
  for (int m = 0; m < M; ++m) {
    int32_t b = static_cast<int32_t>(floorf(ff_mul(ff_div(lg[m], sum), total_f)));
    b = b > total ? total : b;  // guards D = 1 + rounding
    out[m] = b;
    assigned += b;
  }
  for (int32_t r = assigned; r < total; ++r) out[dirichlet_log(s, alpha, M, lg)] += 1;
  for (int m = 0; m < M; ++m) out[m] = out[m] < cap[m] ? out[m] : cap[m];
}

// The per-op configuration, plain arrays so both executors read it the same way.
struct BudgetConfig {
  int M;                   // modalities
  int C;                   // mixture components
  const float* alpha_in;   // [C, M]
  const float* alpha_tg;   // [C, M]
  const float* weights;    // [C] or nullptr (uniform)
  const int32_t* size;     // [M] tokens per image grid / max tokens per sequence
  const uint8_t* is_image; // [M]
  int32_t in_lo, in_hi, tg_lo, tg_hi;  // inclusive token-count ranges
};

// Budgets of one sample: component, input[M], target[M].
FF_INLINE void budget_sample(const BudgetConfig& cfg, uint64_t seed, uint64_t offset, uint32_t sample,
                             int32_t* component, int32_t* in_budget, int32_t* tg_budget) {
  PhiloxStream s = make_stream(seed, offset, sample, kDomainBudget);
  int c = 0;
  if (cfg.weights != nullptr) {
    float wsum = 0.0f;
    for (int i = 0; i < cfg.C; ++i) wsum = ff_add(wsum, cfg.weights[i]);
    const float u = ff_mul(next_open01(s), wsum);
    float acc = 0.0f;
    c = cfg.C - 1;  // reached only by rounding at the top: the last component that can be drawn
    while (c > 0 && !(cfg.weights[c] > 0.0f)) --c;
    for (int i = 0; i < cfg.C; ++i) {
      acc = ff_add(acc, cfg.weights[i]);
      if (u < acc && cfg.weights[i] > 0.0f) {
        c = i;
        break;
      }
    }
  } else {
    c = static_cast<int>(next_below(s, static_cast<uint64_t>(cfg.C)));
  }
  *component = c;
  const int32_t n_in = cfg.in_lo + static_cast<int32_t>(next_below(s, static_cast<uint64_t>(cfg.in_hi - cfg.in_lo + 1)));
  const int32_t n_tg = cfg.tg_lo + static_cast<int32_t>(next_below(s, static_cast<uint64_t>(cfg.tg_hi - cfg.tg_lo + 1)));
  float lg[kMaskMaxModalities];
  int32_t cap[kMaskMaxModalities];
  for (int m = 0; m < cfg.M; ++m) cap[m] = cfg.size[m];
  apportion(s, cfg.alpha_in + c * cfg.M, cfg.M, n_in, cap, lg, in_budget);
  for (int m = 0; m < cfg.M; ++m) cap[m] = cfg.is_image[m] ? cfg.size[m] - in_budget[m] : cfg.size[m];
  apportion(s, cfg.alpha_tg + c * cfg.M, cfg.M, n_tg, cap, lg, tg_budget);
}

// Layout of one sample: encoder slots (inputs) and decoder slots (targets) in modality order, then
// position order. `offset_of[m]` is modality m's start in the concatenated per-sample token buffer;
// an image modality has size[m] tokens there, a sequence the span-masked buffer of 2 (size + 1)
// slots with its inputs at [0, seq_in) and its targets at [b_in, b_in + seq_tg).
// Decoder metadata for masked_attention: segment = modality; rank/limit give 4M's rule
// (bidirectional inside an image modality: rank 0, limit 0; causal inside a sequence: rank = limit
// = the slot's order). Padding slots: index 0, modality 0, segment -1, limit -1, invalid.
// `order` / `role` are scratch of max(size) entries. Returns 0; 1 when the slots overflow; 2 when a
// budget does not fit its modality (nothing out of bounds is written either way).
struct LayoutRow {
  int64_t* enc_index;
  int32_t* enc_modality;
  int32_t* enc_position;
  bool* enc_valid;
  int64_t* dec_index;
  int32_t* dec_modality;
  int32_t* dec_position;
  bool* dec_valid;
  int32_t* dec_segment;
  int32_t* dec_rank;
  int32_t* dec_limit;
};

FF_INLINE int layout_sample(const int32_t* size, const uint8_t* is_image, const int64_t* offset_of, int M,
                            const int32_t* in_budget, const int32_t* tg_budget, const int32_t* seq_in,
                            const int32_t* seq_tg, int64_t num_enc, int64_t num_dec, uint64_t seed,
                            uint64_t offset, uint32_t sample, int32_t* order, uint8_t* role, LayoutRow out) {
  int64_t e = 0, d = 0;
  for (int m = 0; m < M; ++m) {
    const int32_t n = size[m];
    if (is_image[m]) {
      const int32_t k_in = in_budget[m], k = in_budget[m] + tg_budget[m];
      if (k_in < 0 || tg_budget[m] < 0 || k > n) return 2;
      if (e + k_in > num_enc || d + (k - k_in) > num_dec) return 1;
      PhiloxStream s = make_stream(seed, offset, sample, kDomainSelect + static_cast<uint32_t>(m));
      for (int32_t i = 0; i < n; ++i) {
        order[i] = i;
        role[i] = 0;
      }
      for (int32_t i = 0; i < k; ++i) {  // partial Fisher-Yates
        const int32_t j = i + static_cast<int32_t>(next_below_small(s, static_cast<uint32_t>(n - i)));
        const int32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
        role[order[i]] = i < k_in ? 1 : 2;
      }
      for (int32_t p = 0; p < n; ++p) {
        if (role[p] == 1) {
          out.enc_index[e] = offset_of[m] + p;
          out.enc_modality[e] = m;
          out.enc_position[e] = p;
          out.enc_valid[e] = true;
          ++e;
        } else if (role[p] == 2) {
          out.dec_index[d] = offset_of[m] + p;
          out.dec_modality[d] = m;
          out.dec_position[d] = p;
          out.dec_valid[d] = true;
          out.dec_segment[d] = m;
          out.dec_rank[d] = 0;
          out.dec_limit[d] = 0;
          ++d;
        }
      }
    } else {
      if (seq_in[m] < 0 || seq_tg[m] < 0 || seq_in[m] > in_budget[m] || in_budget[m] > n ||
          in_budget[m] + seq_tg[m] > 2 * (n + 1)) {
        return 2;
      }
      if (e + seq_in[m] > num_enc || d + seq_tg[m] > num_dec) return 1;
      for (int32_t p = 0; p < seq_in[m]; ++p) {
        out.enc_index[e] = offset_of[m] + p;
        out.enc_modality[e] = m;
        out.enc_position[e] = p;
        out.enc_valid[e] = true;
        ++e;
      }
      for (int32_t t = 0; t < seq_tg[m]; ++t) {
        const int32_t p = in_budget[m] + t;
        out.dec_index[d] = offset_of[m] + p;
        out.dec_modality[d] = m;
        out.dec_position[d] = p;
        out.dec_valid[d] = true;
        out.dec_segment[d] = m;
        out.dec_rank[d] = t;
        out.dec_limit[d] = t;
        ++d;
      }
    }
  }
  for (; e < num_enc; ++e) {
    out.enc_index[e] = 0;
    out.enc_modality[e] = 0;
    out.enc_position[e] = 0;
    out.enc_valid[e] = false;
  }
  for (; d < num_dec; ++d) {
    out.dec_index[d] = 0;
    out.dec_modality[d] = 0;
    out.dec_position[d] = 0;
    out.dec_valid[d] = false;
    out.dec_segment[d] = -1;
    out.dec_rank[d] = 0;
    out.dec_limit[d] = -1;
  }
  return 0;
}

// 4M's span masking of one sequence of `length` tokens (already truncated to max_tokens), into a
// source buffer of 2 (max_tokens + 1) slots: inputs at [0, n_in), targets at [b_in, b_in + n_tg),
// kSpanPad elsewhere. Keep probability by mode (0 random, 1 all, 2 binary); with b_in == 0 every
// token is masked. While the input is longer than b_in the keep probability shrinks by 0.9 and
// the mask is redrawn. A target longer than b_tg is cut at a sentinel as 4M does: a random
// sentinel (not the closing one) when b_tg tokens from it exist, else the earliest sentinel from
// which the rest fits. Scratch: `keep` of `length` bytes, `tgt` of 2 length + 2 entries (the
// target before the cut can exceed the buffer space after b_in). Returns the highest sentinel used.
FF_INLINE int32_t span_mask_sample(int32_t length, int32_t max_tokens, int32_t b_in, int32_t b_tg, int keep_mode,
                                   uint64_t seed, uint64_t offset, uint32_t sample, uint32_t modality,
                                   uint8_t* keep, int32_t* tgt, int32_t* source, int32_t* n_in_out,
                                   int32_t* n_tg_out) {
  PhiloxStream s = make_stream(seed, offset, sample, kDomainSpan + modality);
  float keep_prob = 0.0f;
  if (b_in > 0) {
    if (keep_mode == 0) keep_prob = next_open01(s);
    else if (keep_mode == 1) keep_prob = 1.0f;
    else keep_prob = (next_word(s) & 1u) ? 1.0f : 0.0f;
  }
  int32_t n_in = 0;
  for (;;) {
    n_in = 0;
    bool prev_masked = false;
    for (int32_t j = 0; j < length; ++j) {
      // u in (0, 1): keep_prob 1 keeps all, 0 none (4M: torch.rand <= keep_prob).
      keep[j] = b_in > 0 && next_open01(s) < keep_prob;
      n_in += (keep[j] || !prev_masked) ? 1 : 0;
      prev_masked = !keep[j];
      // n_in only grows with j: this trial has failed, and drawing its remaining tokens would
      // not change that (the law of the accepted mask is the same as 4M's full redraw).
      if (b_in > 0 && n_in > b_in) break;
    }
    if (b_in == 0 || n_in <= b_in) break;  // keep_prob reaches 0 eventually: then n_in <= 1
    keep_prob = ff_mul(keep_prob, 0.9f);
  }
  const int32_t slots = 2 * (max_tokens + 1);
  for (int32_t i = 0; i < slots; ++i) source[i] = kSpanPad;
  // Input: kept tokens, one sentinel per masked run. Target: each run as sentinel + tokens, then
  // the closing sentinel; cut, then copied to b_in.
  int32_t sentinel = 0, i_in = 0, n_tg = 0;
  bool prev_masked = false;
  for (int32_t j = 0; j < length; ++j) {
    if (keep[j]) {
      source[i_in++] = j;
      prev_masked = false;
      continue;
    }
    if (!prev_masked) {
      ++sentinel;
      if (b_in > 0) source[i_in++] = -sentinel;
      tgt[n_tg++] = -sentinel;
    }
    tgt[n_tg++] = j;
    prev_masked = true;
  }
  tgt[n_tg++] = -(sentinel + 1);
  if (n_tg > b_tg) {
    int32_t num_sentinels = 0;
    for (int32_t i = 0; i < n_tg; ++i) num_sentinels += tgt[i] < 0 ? 1 : 0;
    const int32_t pick_n = num_sentinels - 1 > 1 ? num_sentinels - 1 : 1;
    const int32_t pick = static_cast<int32_t>(next_below(s, static_cast<uint64_t>(pick_n)));
    int32_t start = -1, seen = 0;
    for (int32_t i = 0; i < n_tg; ++i) {
      if (tgt[i] < 0 && seen++ == pick) {
        start = i;
        break;
      }
    }
    int32_t new_len;
    if (n_tg - start >= b_tg) {
      new_len = b_tg;
    } else {
      for (int32_t i = 0; i < n_tg; ++i) {
        if (tgt[i] < 0 && n_tg - i <= b_tg) {
          start = i;
          break;
        }
      }
      new_len = n_tg - start;
    }
    for (int32_t i = 0; i < new_len; ++i) tgt[i] = tgt[start + i];
    n_tg = new_len;
  }
  for (int32_t i = 0; i < n_tg; ++i) source[b_in + i] = tgt[i];
  *n_in_out = i_in;
  *n_tg_out = n_tg;
  return sentinel + 1;
}

}  // namespace kernels
}  // namespace fourm_fast
