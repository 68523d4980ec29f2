// masked_attention arithmetic shared by the CPU executor (csrc/cpu/attention_cpu.cpp) and the CUDA
// executor: the visibility rule computed from O(N) per-token metadata (never a B x N x N mask), and
// the softmax / logsumexp / backward formulas of flash-style attention.
//
// Key j is visible to query i iff
//     k_valid[j]  and  (no segments or q_segment[i] == k_segment[j])
//                 and  (no ranks or k_rank[j] <= q_limit[i]).
// 4M's decoder self-attention (FourM.adapt_decoder_attention_mask, causal=False, sep=True) is
// segments = modality ids, k_rank = position, q_limit = cumsum(decoder_attention_mask) - 1.
#pragma once

#include "common.h"

namespace fourm_fast {
namespace kernels {

struct AttnQueryMeta {
  int32_t segment;  // ignored when has_segments is false
  int32_t limit;    // ignored when has_ranks is false
};

struct AttnKeyMeta {
  bool valid;
  int32_t segment;
  int32_t rank;
};

FF_INLINE bool attn_visible(const AttnQueryMeta& q, const AttnKeyMeta& k, bool has_segments, bool has_ranks) {
  return k.valid && (!has_segments || q.segment == k.segment) && (!has_ranks || k.rank <= q.limit);
}

// The same rule on a vector of keys (GCC/Clang vector extension, CPU executor): I is a vector of
// int32 lanes, valid is all-ones where k_valid, and the result is all-ones where visible.
template <typename I>
FF_INLINE I attn_visible_lanes(I valid, I k_segment, I k_rank, const AttnQueryMeta& q, bool has_segments,
                               bool has_ranks) {
  I m = valid;
  if (has_segments) m &= k_segment == q.segment;
  if (has_ranks) m &= k_rank <= q.limit;
  return m;
}

// Conservative tile tests over per-tile bounds. The CUDA executor uses them to skip tiles (the CPU
// executor finds exact key ranges per query block) and to drop the per-element mask on tiles where
// every pair is visible. A false "maybe" or "not all" only costs time; a false "no" or "all" would
// be a bug, so both only use bounds.
struct AttnTileBounds {
  int32_t seg_min, seg_max;    // over the tile's tokens (valid keys only for a key tile)
  int32_t rank_min, rank_max;  // key tiles: smallest and largest rank of a valid key
  int32_t limit_min;           // query tiles: smallest limit
  int32_t limit_max;           // query tiles: largest limit
  bool any_valid;              // key tiles: at least one valid key
  bool all_valid;              // key tiles: a full tile (no key past the end) of valid keys
};

// Bounds of a key tile: start from attn_key_tile_start (full_tile: the tile has no key past the
// end) and add each of its keys.
FF_INLINE AttnTileBounds attn_key_tile_start(bool full_tile) {
  return {INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, 0, 0, false, full_tile};
}

FF_INLINE void attn_key_tile_add(AttnTileBounds& r, const AttnKeyMeta& k) {
  if (!k.valid) {
    r.all_valid = false;
    return;
  }
  r.any_valid = true;
  r.seg_min = k.segment < r.seg_min ? k.segment : r.seg_min;
  r.seg_max = k.segment > r.seg_max ? k.segment : r.seg_max;
  r.rank_min = k.rank < r.rank_min ? k.rank : r.rank_min;
  r.rank_max = k.rank > r.rank_max ? k.rank : r.rank_max;
}

// Bounds of a query tile over its real queries (those past the end are never stored).
FF_INLINE AttnTileBounds attn_query_tile_start() { return {INT32_MAX, INT32_MIN, 0, 0, INT32_MAX, INT32_MIN, true, true}; }

FF_INLINE void attn_query_tile_add(AttnTileBounds& r, const AttnQueryMeta& q) {
  r.seg_min = q.segment < r.seg_min ? q.segment : r.seg_min;
  r.seg_max = q.segment > r.seg_max ? q.segment : r.seg_max;
  r.limit_min = q.limit < r.limit_min ? q.limit : r.limit_min;
  r.limit_max = q.limit > r.limit_max ? q.limit : r.limit_max;
}

FF_INLINE bool attn_tiles_may_meet(const AttnTileBounds& q, const AttnTileBounds& k, bool has_segments,
                                   bool has_ranks) {
  if (!k.any_valid) return false;
  if (has_segments && (k.seg_max < q.seg_min || q.seg_max < k.seg_min)) return false;
  if (has_ranks && k.rank_min > q.limit_max) return false;
  return true;
}

// Every key of tile k is visible to every query of tile q (queries past the end excluded).
FF_INLINE bool attn_tiles_all_visible(const AttnTileBounds& q, const AttnTileBounds& k, bool has_segments,
                                      bool has_ranks) {
  if (!k.all_valid) return false;
  if (has_segments && !(q.seg_min == q.seg_max && k.seg_min == k.seg_max && q.seg_min == k.seg_min)) return false;
  if (has_ranks && k.rank_max > q.limit_min) return false;
  return true;
}

// Row statistics: logsumexp of the visible scaled scores; -inf when the query sees no key
// (its output is then 0 and its gradients 0, never NaN).
FF_INLINE float attn_lse(float row_max, float row_sum) {
  return row_sum > 0.0f ? row_max + logf(row_sum) : -positive_infinity_f32();
}

// Probability of a visible key from its scaled score and the row's logsumexp.
FF_INLINE float attn_prob(float scaled_score, float lse) {
  return lse == -positive_infinity_f32() ? 0.0f : expf(scaled_score - lse);
}

// Base-2 forms of the same numbers, for executors whose fast exponential is 2^x (the GPU's ex2):
// exp(s * scale - lse) = 2^(s * scale * log2(e) - lse * log2(e)). lse2 = lse * log2(e) keeps -inf
// for a row that sees no key, whose probabilities are then exactly 0 whatever the score.
constexpr float kAttnLog2e = 1.4426950408889634f;
constexpr float kAttnLn2 = 0.6931471805599453f;

FF_INLINE float attn_prob2(float score2, float lse2) {
  return lse2 == -positive_infinity_f32() ? 0.0f : exp2f(score2 - lse2);
}

// lse from a base-2 running maximum (of s * scale * log2(e)) and the sum of 2^(x - max).
FF_INLINE float attn_lse_from2(float max2, float sum) {
  return sum > 0.0f ? (max2 + log2f(sum)) * kAttnLn2 : -positive_infinity_f32();
}

// Backward through softmax: dS = P (dP - delta), delta = sum_d dO * O. T is float, or a vector of
// floats where an executor computes a row of lanes at once (GCC vector types select per lane).
// Where P is 0 (a masked or unseen key) dS is 0 whatever dP is: a masked key's finite but huge V
// row (|V| near FLT_MAX) overflows dP = dO V^T to inf, and 0 * inf would make every dQ NaN.
template <typename T>
FF_INLINE T attn_dscore(T p, T dp, float delta) { return p == 0.0f ? p : p * (dp - delta); }

}  // namespace kernels
}  // namespace fourm_fast
