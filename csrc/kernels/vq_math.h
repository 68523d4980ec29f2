// vq_lookup arithmetic, shared by the CPU executor (csrc/cpu/vq_cpu.cpp) and the CUDA executor
// (csrc/cuda/vq_cuda.cu). Torch-free: callers convert their storage type to float.
//
// The search ranks codes by a per-code affine function of one dot product,
//     score_j = bias_j + scale * <x, c'_j>,
// which is the only quantity the fused GEMM epilogue needs:
//   l2:     c' = c,        bias = |c|^2,  scale = -2   (|x - c|^2 minus the row constant |x|^2)
//   cosine: c' = c / |c|,  bias = 0,      scale = -1   (argmax of the normalised dot; |x| is a row
//                                                       constant, so x is never normalised here)
// A code with a non-finite entry (or an overflowing |c|^2) gets bias = +inf and can never win:
// comparisons are strict '<', so +inf and NaN scores are never selected. Once a winner is known,
// its distance is recomputed exactly from the original row and code (vq_exact_distance).
#pragma once

#include "common.h"

namespace fourm_fast {
namespace kernels {

enum class VqMetric : int { L2 = 0, Cosine = 1 };

// F.normalize's epsilon, which 4M's cosine codebooks go through.
constexpr float kVqNormEps = 1e-12f;

FF_INLINE float vq_score_scale(VqMetric metric) { return metric == VqMetric::L2 ? -2.0f : -1.0f; }

FF_INLINE float vq_score(float bias, float scale, float dot) { return fmaf(scale, dot, bias); }

// Total order used by every reduction: smaller score first, then smaller index. A candidate with
// index < 0 (no code yet) always loses to a real code with a comparable score.
FF_INLINE bool vq_better(float score, int64_t index, float best_score, int64_t best_index) {
  if (index < 0) return false;
  if (best_index < 0) return score < positive_infinity_f32();
  return score < best_score || (score == best_score && index < best_index);
}

// Per-code preparation: given |c|^2 and whether every entry is finite, the code's bias and the
// divisor of its entries before the dot product (1 for l2, max(|c|, eps) for cosine). A division,
// as F.normalize does, not a product with 1/|c|: that rounds twice, so a D = 1 code read
// 0.99999994 instead of 1 and exact cosine ties went to a larger index.
struct VqCodePrep {
  float bias;
  float divisor;
};

FF_INLINE VqCodePrep vq_prepare_code(float sum_sq, bool all_finite, VqMetric metric) {
  VqCodePrep p;
  if (!all_finite || !is_finite_f32(sum_sq)) {
    p.bias = positive_infinity_f32();
    p.divisor = 1.0f;  // unused: such a code is stored as zeros
    return p;
  }
  if (metric == VqMetric::L2) {
    p.bias = sum_sq;
    p.divisor = 1.0f;
  } else {
    const float norm = sqrtf(sum_sq);
    p.bias = 0.0f;
    p.divisor = norm > kVqNormEps ? norm : kVqNormEps;
  }
  return p;
}

// One entry of a prepared code (c_d or c_d / |c|).
FF_INLINE float vq_prepared_entry(float v, const VqCodePrep& p) { return v / p.divisor; }

// Exact distance between row x and code c, both of length D, accumulated in fp32 in index order.
//   l2:     sum_d (x_d - c_d)^2                               (squared Euclidean distance)
//   cosine: 1 - <x, c> / (max(|x|, eps) * max(|c|, eps))      (cosine distance, in [0, 2])
// LoadX/LoadC map d -> float. Callers check the row with vq_row_is_finite first.
template <class LoadX, class LoadC>
FF_INLINE float vq_exact_distance(int64_t D, LoadX load_x, LoadC load_c, VqMetric metric) {
  float acc = 0.0f, xx = 0.0f, cc = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float xv = load_x(d);
    const float cv = load_c(d);
    if (metric == VqMetric::L2) {
      const float diff = xv - cv;
      acc = fmaf(diff, diff, acc);
    } else {
      acc = fmaf(xv, cv, acc);
      xx = fmaf(xv, xv, xx);
      cc = fmaf(cv, cv, cc);
    }
  }
  if (metric == VqMetric::L2) return acc;
  if (!is_finite_f32(xx) || !is_finite_f32(cc) || !is_finite_f32(acc)) {
    // |x|^2, |c|^2 or <x, c> overflowed (entries beyond about 1.8e19): the cosine distance does not
    // depend on scale, so sum again with x and c divided by powers of two near their largest
    // magnitudes (exact, as long as no entry drops into the subnormals) and carry the scales into
    // the eps clamps: 1 - <x', c'> / (max(|x'|, eps / sx) max(|c'|, eps / sc)).
    float mx = 0.0f, mc = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      mx = fmaxf(mx, fabsf(load_x(d)));
      mc = fmaxf(mc, fabsf(load_c(d)));
    }
    // (ldexpf of an exponent is exact on host and device alike; exp2f is not guaranteed to be)
    const float sx = mx > 0.0f ? ldexpf(1.0f, ilogbf(mx)) : 1.0f;
    const float sc = mc > 0.0f ? ldexpf(1.0f, ilogbf(mc)) : 1.0f;
    acc = xx = cc = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float xv = load_x(d) / sx, cv = load_c(d) / sc;
      acc = fmaf(xv, cv, acc);
      xx = fmaf(xv, xv, xx);
      cc = fmaf(cv, cv, cc);
    }
    const float nx = sqrtf(xx), nc = sqrtf(cc), ex = kVqNormEps / sx, ec = kVqNormEps / sc;
    return 1.0f - acc / ((nx > ex ? nx : ex) * (nc > ec ? nc : ec));
  }
  const float nx = sqrtf(xx), nc = sqrtf(cc);
  return 1.0f - acc / ((nx > kVqNormEps ? nx : kVqNormEps) * (nc > kVqNormEps ? nc : kVqNormEps));
}

// True when every entry of the row is finite (a row with NaN/inf maps to index -1).
template <class LoadX>
FF_INLINE bool vq_row_is_finite(int64_t D, LoadX load_x) {
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) finite = finite && is_finite_f32(load_x(d));
  return finite;
}

// The last step of both executors for one row: index -1 and distance NaN when no code won or the
// row holds NaN/inf, else the winner and its exact distance from the original (strided) inputs.
template <typename scalar_t>
FF_INLINE void vq_finalize_row(const scalar_t* xr, int64_t xs1, const scalar_t* codebook, int64_t cs0,
                               int64_t cs1, int64_t D, int64_t best_index, VqMetric metric,
                               int64_t* out_index, float* out_distance) {
  const auto load_x = [&](int64_t d) { return static_cast<float>(xr[d * xs1]); };
  if (best_index < 0 || !vq_row_is_finite(D, load_x)) {
    *out_index = -1;
    *out_distance = quiet_nan_f32();
    return;
  }
  const scalar_t* cr = codebook + best_index * cs0;
  *out_index = best_index;
  *out_distance = vq_exact_distance(D, load_x, [&](int64_t d) { return static_cast<float>(cr[d * cs1]); }, metric);
}

}  // namespace kernels
}  // namespace fourm_fast
