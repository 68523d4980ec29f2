// Arithmetic of rows_linear: y[r, n] = sum_k x[r, k] * w[n, k] in one fixed order, so every
// executor (the portable loop, the AVX2 kernel) returns the same bits for the same inputs,
// whatever the thread count (signed zeros included; a NaN stays NaN, its payload may differ).
//
// The order: lane l (0..7) accumulates the products with k = l, l + 8, l + 16, ... by fused
// multiply-adds in increasing k, starting from +0; the lanes then combine as
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), which is the order an 8-wide register's
// halves-then-pairs reduction takes.
//
// Weights may be float32, bfloat16 or float16 (x is then widened to float32 first): every 16-bit
// value is exact in float32, so the same order gives the same sum, rounded once to the weights'
// dtype by the caller.
#pragma once

#include "common.h"

namespace fourm_fast {
namespace kernels {

constexpr int kRowsLinearLanes = 8;

FF_INLINE float rows_linear_combine(const float* lane) {
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// One output: the dot product of x and w (K values each, unit stride) in the order above. W is
// float or a 16-bit float type that converts to float exactly (c10::BFloat16, c10::Half).
template <class W>
FF_INLINE float rows_linear_dot(const float* x, const W* w, int64_t K) {
  float lane[kRowsLinearLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t k = 0; k < K; ++k) {
    lane[k % kRowsLinearLanes] = fmaf(x[k], static_cast<float>(w[k]), lane[k % kRowsLinearLanes]);
  }
  return rows_linear_combine(lane);
}

}  // namespace kernels
}  // namespace fourm_fast
