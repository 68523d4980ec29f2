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

// Conservative tile test: can any key of a tile be visible to any query of a tile? The CUDA
// executor uses it to skip tiles (the CPU executor finds exact key ranges per query block); a
// false "maybe" only costs time, a false "no" would be a bug, so it only uses bounds.
struct AttnTileBounds {
  int32_t seg_min, seg_max;  // over the tile's tokens (valid keys only for a key tile)
  int32_t rank_min;          // key tiles: smallest rank of a valid key
  int32_t limit_max;         // query tiles: largest limit
  bool any_valid;            // key tiles: at least one valid key
};

FF_INLINE bool attn_tiles_may_meet(const AttnTileBounds& q, const AttnTileBounds& k, bool has_segments,
                                   bool has_ranks) {
  if (!k.any_valid) return false;
  if (has_segments && (k.seg_max < q.seg_min || q.seg_max < k.seg_min)) return false;
  if (has_ranks && k.rank_min > q.limit_max) return false;
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

// Backward through softmax: dS = P (dP - delta), delta = sum_d dO * O. T is float, or a vector of
// floats where an executor computes a row of lanes at once.
template <typename T>
FF_INLINE T attn_dscore(T p, T dp, float delta) { return p * (dp - delta); }

}  // namespace kernels
}  // namespace fourm_fast
