// Deterministic fp32 arithmetic: exp and log built from IEEE-exact operations only (explicit fmaf,
// correctly rounded + - * /, integer bit manipulation), so host and device compute bit-identical
// values. Library expf/logf differ between glibc and CUDA's libdevice by an ulp here and there,
// which would let the same seed draw different tokens on CPU and GPU.
//
// ff_mul/ff_add/ff_sub/ff_div are never contracted into an FMA by either compiler (nvcc fuses
// a*b+c by default; the host build uses -ffp-contract=off), so every rounding step is spelled out.
#pragma once

#include "common.h"

#if defined(__CUDA_ARCH__)
#define FF_MUL(a, b) __fmul_rn((a), (b))
#define FF_ADD(a, b) __fadd_rn((a), (b))
#define FF_SUB(a, b) __fsub_rn((a), (b))
#define FF_DIV(a, b) __fdiv_rn((a), (b))
#define FF_SQRT(a) __fsqrt_rn(a)
#else
#define FF_MUL(a, b) ((a) * (b))
#define FF_ADD(a, b) ((a) + (b))
#define FF_SUB(a, b) ((a) - (b))
#define FF_DIV(a, b) ((a) / (b))
#define FF_SQRT(a) sqrtf(a)
#endif

namespace fourm_fast {
namespace kernels {

FF_INLINE float ff_mul(float a, float b) { return FF_MUL(a, b); }
FF_INLINE float ff_add(float a, float b) { return FF_ADD(a, b); }
FF_INLINE float ff_sub(float a, float b) { return FF_SUB(a, b); }
FF_INLINE float ff_div(float a, float b) { return FF_DIV(a, b); }
// IEEE square root is correctly rounded on both targets (sqrtss on the host; nvcc's default
// -prec-sqrt=true, made explicit here).
FF_INLINE float ff_sqrt(float a) { return FF_SQRT(a); }

FF_INLINE uint32_t float_bits(float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
  return u;
}

FF_INLINE float bits_float(uint32_t u) {
  float v;
  __builtin_memcpy(&v, &u, sizeof(v));
  return v;
}

// e^x to about 2 ulp. Results below the smallest normal float (x < -87.33) are 0 and x > 88.72
// gives +inf, so no subnormal arithmetic (flushed differently by different targets) is involved.
// Written without branches (selects only) so the CPU loops that call it vectorise.
FF_INLINE float ff_exp(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  const bool under = !(x > lo);  // also true for NaN
  const bool over = x > hi;
  float xc = under ? lo : x;
  xc = over ? hi : xc;
  // x = n ln2 + r, |r| <= ln2/2, with ln2 split in two so n*ln2_hi is exact (Cody and Waite).
  const float n = floorf(ff_add(ff_mul(xc, 1.44269502f), 0.5f));
  float r = fmaf(-n, 0.693145751953125f, xc);
  r = fmaf(-n, 1.428606765330187e-06f, r);
  // Taylor series of e^r to degree 7: truncation below 3e-9 relative on |r| <= 0.347.
  float p = 1.98412698e-04f;
  p = fmaf(p, r, 1.38888889e-03f);
  p = fmaf(p, r, 8.33333333e-03f);
  p = fmaf(p, r, 4.16666667e-02f);
  p = fmaf(p, r, 1.66666667e-01f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  // Scale by 2^n in two steps so n = -126 or 128 needs no subnormal or overflowing power.
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1, n2 = ni - n1;
  const float s1 = bits_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_float(static_cast<uint32_t>(n2 + 127) << 23);
  float result = ff_mul(ff_mul(p, s1), s2);
  result = over ? positive_infinity_f32() : result;
  result = under ? 0.0f : result;
  return x != x ? x : result;
}

// Natural log of a positive normal float to about 2 ulp (0 -> -inf; negative or NaN -> NaN;
// subnormal inputs are treated as 0, they never arise from the callers).
FF_INLINE float ff_log(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -positive_infinity_f32() : quiet_nan_f32();
  if (x == positive_infinity_f32()) return x;
  const uint32_t bits = float_bits(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  if (e == -127) return -positive_infinity_f32();
  uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;  // mantissa in [1, 2)
  if (mbits > 0x3fb504f3u) {                          // above sqrt(2): halve, so m in [0.707, 1.414)
    mbits -= 0x00800000u;
    e += 1;
  }
  const float f = ff_sub(bits_float(mbits), 1.0f);  // exact (Sterbenz)
  // log(1 + f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: odd series to s^11.
  const float s = ff_div(f, ff_add(2.0f, f));
  const float z = ff_mul(s, s);
  float p = 0.0909090909f;
  p = fmaf(p, z, 0.111111111f);
  p = fmaf(p, z, 0.142857143f);
  p = fmaf(p, z, 0.2f);
  p = fmaf(p, z, 0.333333333f);
  p = fmaf(p, z, 1.0f);
  const float log1pf_ = ff_mul(ff_add(s, s), p);
  const float ef = static_cast<float>(e);
  return fmaf(ef, 0.693145751953125f, fmaf(ef, 1.428606765330187e-06f, log1pf_));
}

}  // namespace kernels
}  // namespace fourm_fast
