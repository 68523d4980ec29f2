// Radix selection of a value threshold over ordered float keys (CPU side of the primitive described
// in csrc/kernels/sampling_math.h): the smallest present key v such that the total weight of keys
// strictly greater than v is <= budget. Four passes of 8-bit digits, each narrowing to one bucket;
// integer weights make the result independent of visiting order.
#pragma once

#include <array>
#include <cstdint>

namespace fourm_fast {

// weights == nullptr means weight 1 per key (then it selects the (budget + 1)-th largest value).
// n must be >= 1. The arrays are scratch: after each digit they are compacted to the chosen bucket.
inline uint32_t threshold_select(uint32_t* keys, uint64_t* weights, int64_t n, uint64_t budget) {
  uint32_t prefix = 0, mask = 0;
  uint64_t above = 0;  // weight of keys above the current prefix range
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<uint64_t, 256> mass{};
    std::array<uint32_t, 256> count{};
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t digit = (keys[i] >> shift) & 0xffu;
      mass[digit] += weights ? weights[i] : 1u;
      count[digit] += 1;
    }
    // Walk digits downwards; the chosen bucket is the lowest non-empty one whose weight above it
    // still fits the budget (the weight above a bucket only grows as the digit falls).
    int chosen = -1;
    uint64_t acc = above, chosen_above = above;
    for (int d = 255; d >= 0; --d) {
      if (count[d] == 0) continue;
      if (acc > budget) break;
      chosen = d;
      chosen_above = acc;
      acc += mass[d];
    }
    // The largest key always qualifies (nothing above it), so some bucket is chosen.
    prefix |= static_cast<uint32_t>(chosen) << shift;
    mask |= 0xffu << shift;
    above = chosen_above;
    int64_t kept = 0;  // later digits only look inside the chosen bucket
    for (int64_t i = 0; i < n; ++i) {
      if ((keys[i] & mask) != prefix) continue;
      keys[kept] = keys[i];
      if (weights) weights[kept] = weights[i];
      ++kept;
    }
    n = kept;
  }
  return prefix;
}

}  // namespace fourm_fast
