// Radix selection of a value threshold over ordered float keys (CPU side of the primitive described
// in csrc/kernels/sampling_math.h): the smallest present key v such that the total weight of keys
// strictly greater than v is <= budget. The answer is defined by the keys alone, so the CPU may
// use its own digit layout (11, 11, 10 bits: the first digit holds sign, exponent and two mantissa
// bits, which already splits real logits finely); the GPU happens to use the same layout. Integer weights
// make the result independent of visiting order.
#pragma once

#include <cstdint>
#include <vector>

namespace fourm_fast {

// weights == nullptr means weight 1 per key (then it selects the (budget + 1)-th largest value).
// With weights (top-p), budget must be below the total weight and keys of weight 0 must lie below
// every key of positive weight, as filter_cut's are. n must be >= 1. The arrays are scratch: after
// each digit they are compacted to the chosen bucket.
// static: this header is compiled into each ISA copy of the sampling rows; an out-of-line copy
// with external linkage built with AVX-512 flags could be the one the linker keeps for all.
static inline uint32_t threshold_select(uint32_t* keys, uint64_t* weights, int64_t n, uint64_t budget) {
  constexpr int kShifts[3] = {21, 10, 0};
  constexpr int kBits[3] = {11, 11, 10};
  // One histogram: a bucket is empty iff its mass is 0. With weights, a key of weight 0 lies below
  // every key of positive weight (the weights grow with the key, and tokens outside the top-k set
  // weigh 0 and lie below it), so the weight above it is the total, which exceeds any top-p
  // budget (floor(top_p * total) with top_p < 1): such keys can never be the answer, and skipping
  // their buckets changes nothing. Without weights every key weighs 1.
  thread_local std::vector<uint64_t> mass(2048);
  uint32_t prefix = 0, mask = 0;
  uint64_t above = 0;  // weight of keys above the current prefix range
  for (int level = 0; level < 3; ++level) {
    const int shift = kShifts[level];
    const uint32_t buckets = 1u << kBits[level], digit_mask = buckets - 1;
    std::fill(mass.begin(), mass.begin() + buckets, 0);
    if (weights) {
      for (int64_t i = 0; i < n; ++i) mass[(keys[i] >> shift) & digit_mask] += weights[i];
    } else {
      for (int64_t i = 0; i < n; ++i) mass[(keys[i] >> shift) & digit_mask] += 1u;
    }
    // Walk digits downwards; the chosen bucket is the lowest non-empty one whose weight above it
    // still fits the budget (the weight above a bucket only grows as the digit falls).
    int64_t chosen = -1;
    uint64_t acc = above, chosen_above = above;
    for (int64_t d = buckets - 1; d >= 0; --d) {
      if (mass[d] == 0) continue;
      if (acc > budget) break;
      chosen = d;
      chosen_above = acc;
      acc += mass[d];
    }
    // The largest key always qualifies (nothing above it), so some bucket is chosen.
    prefix |= static_cast<uint32_t>(chosen) << shift;
    mask |= digit_mask << shift;
    above = chosen_above;
    if (level == 2) break;
    // Later digits only look inside the chosen bucket. Branch-free compaction: matches are rare and
    // scattered, so a branch would mispredict on most of them.
    int64_t kept = 0;
    if (weights) {
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = keys[i];
        const uint64_t w = weights[i];
        keys[kept] = key;
        weights[kept] = w;
        kept += (key & mask) == prefix;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = keys[i];
        keys[kept] = key;
        kept += (key & mask) == prefix;
      }
    }
    n = kept;
  }
  return prefix;
}

}  // namespace fourm_fast
