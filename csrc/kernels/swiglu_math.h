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

// Gradients of out = silu(a) * b given dout = g, with d = 1 + e^-a and s = sigmoid(a) = 1 / d:
//   d up   = g * silu(a), silu(a) = a / d exactly as the forward computes it
//   d gate = g * b * silu'(a),  silu'(a) = s (1 + a (1 - s)) = (1 + a (1 - s)) / d
// Dividing by d rather than multiplying by s keeps subnormals out of the intermediate values
// (s is subnormal for a in about (-88.7, -87.3), where a flush-to-zero CPU would part from the
// GPU); 1 - s is 1 there either way.
FF_INLINE SwigluGrads swiglu_bwd(float g, float a, float b) {
  const float d = ff_add(1.0f, ff_exp(-a));
  const float s = ff_div(1.0f, d);
  const float dsilu = ff_div(ff_add(1.0f, ff_mul(a, ff_sub(1.0f, s))), d);
  return {ff_mul(ff_mul(g, b), dsilu), ff_mul(g, ff_div(a, d))};
}

}  // namespace kernels
}  // namespace fourm_fast
