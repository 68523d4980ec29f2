// Arithmetic of swiglu, the gate of 4M's SwiGLU MLP (ml-4m's gated Mlp: act(fc1 x) * fc3 x with
// SiLU): out = silu(gate) * up, silu(a) = a * sigmoid(a) = a / (1 + e^-a).
//
// Only IEEE-exact operations and ff_exp (det_math.h), in float32 whatever the storage dtype, so
// the CPU loops and the CUDA kernel return the same bits for the same inputs (NaN payloads aside:
// which operand's NaN an operation passes on is the compiler's choice), and each result is
// rounded once to the storage dtype by the caller. Non-finite inputs behave as PyTorch's silu:
// silu(+inf) = inf, silu(-inf) = -inf / inf = NaN, NaN stays NaN.
#pragma once

#include "det_math.h"

namespace fourm_fast {
namespace kernels {

// silu(a) * b, as PyTorch's CPU silu writes it: a / (1 + e^-a).
FF_INLINE float swiglu_fwd(float a, float b) { return ff_mul(ff_div(a, ff_add(1.0f, ff_exp(-a))), b); }

struct SwigluGrads {
  float gate, up;
};

// Gradients of out = silu(a) * b given dout = g:
//   d up   = g * silu(a)
//   d gate = g * b * silu'(a),  silu'(a) = s (1 + a (1 - s)),  s = sigmoid(a) = 1 / (1 + e^-a)
FF_INLINE SwigluGrads swiglu_bwd(float g, float a, float b) {
  const float s = ff_div(1.0f, ff_add(1.0f, ff_exp(-a)));
  const float dsilu = ff_mul(s, ff_add(1.0f, ff_mul(a, ff_sub(1.0f, s))));
  return {ff_mul(ff_mul(g, b), dsilu), ff_mul(g, ff_mul(a, s))};
}

}  // namespace kernels
}  // namespace fourm_fast
