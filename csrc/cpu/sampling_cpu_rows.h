// The per-row work of the CPU sample_tokens executor, compiled twice: once for the baseline ISA
// (sampling_cpu.cpp) and once with AVX2+FMA (sampling_cpu_avx2.cpp), where fmaf becomes one
// instruction instead of a libm call. FF_ROWS_NS names the namespace of each copy.
//
// Each row is read once into a float buffer (guided when CFG is on); thresholds come from radix
// selection over ordered keys (no sort); the draw is the inverse CDF over fixed-point weights.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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
};

struct RowResult {
  int64_t token;
  float prob;
};

// Reads and guides one row into g; returns the status and the row max through m.
template <typename scalar_t>
int32_t load_row(const scalar_t* cond, int64_t cs1, const scalar_t* uncond, int64_t us1, int64_t V,
                 float cfg_scale, float* g, float* m_out) {
  float m = -positive_infinity_f32();
  bool nan = false, pos_inf = false;
  if (uncond != nullptr) {
    for (int64_t t = 0; t < V; ++t) {
      const float v = guided_logit(static_cast<float>(cond[t * cs1]), static_cast<float>(uncond[t * us1]), cfg_scale);
      g[t] = v;
      nan |= v != v;
      pos_inf |= v == positive_infinity_f32();
      m = v > m ? v : m;
    }
  } else {
    for (int64_t t = 0; t < V; ++t) {
      const float v = static_cast<float>(cond[t * cs1]);
      g[t] = v;
      nan |= v != v;
      pos_inf |= v == positive_infinity_f32();
      m = v > m ? v : m;
    }
  }
  *m_out = m;
  if (nan) return kSampleNaN;
  if (pos_inf || m == -positive_infinity_f32()) return kSampleNoFinite;
  return kSampleOk;
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
    int64_t n = 0;
    for (int64_t t = 0; t < V; ++t) {
      if (g[t] != -positive_infinity_f32()) keys[n++] = ordered_key(g[t]);
    }
    if (k < n) cut = key_to_float(threshold_select(keys, nullptr, n, static_cast<uint64_t>(k - 1)));
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
    uint64_t total = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < V; ++t) {
      if (e[t] < 0.0f) continue;
      const uint64_t q = mass_weight(e[t], bits);
      keys[n] = ordered_key(g[t]);
      weights[n++] = q;
      total += q;
    }
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
  uint64_t total = 0;
  for (int64_t t = 0; t < V; ++t) {
    const uint64_t q = mass_weight(e[t], bits);
    w[t] = q;
    total += q;
  }
  // total >= 2^bits: the first maximum is kept with weight exp(0) = 1.
  const uint64_t target = draw_target(total, seed, offset, row);
  uint64_t running = 0;
  for (int64_t t = 0; t < V; ++t) {
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
