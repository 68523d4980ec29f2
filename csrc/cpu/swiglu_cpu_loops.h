// The CPU swiglu loops, compiled three times: baseline ISA (swiglu_cpu_loops.cpp), AVX2+FMA
// (swiglu_cpu_loops_avx2.cpp) and AVX-512 (swiglu_cpu_loops_avx512.cpp). Each element goes through
// csrc/kernels/swiglu_math.h, whose ff_exp is branch-free, so the compiler vectorises the loops
// at the width of the copy's ISA; every copy (and the CUDA kernel) returns the same bits.
// FF_SWIGLU_NS names each copy's namespace.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../kernels/swiglu_math.h"
#include "swiglu_cpu_dispatch.h"

#ifndef FF_SWIGLU_NS
#error "define FF_SWIGLU_NS before including swiglu_cpu_loops.h"
#endif

namespace fourm_fast {
namespace FF_SWIGLU_NS {

// 16-bit inputs are widened into float blocks first: the conversion loops and the float loop
// each vectorise, where one loop mixing c10's conversions with the arithmetic did not.
constexpr int64_t kBlock = 512;

static void fwd_f32(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = kernels::swiglu_fwd(a[i], b[i]);
}

static void bwd_f32(const float* g, const float* a, const float* b, float* da, float* db, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const kernels::SwigluGrads r = kernels::swiglu_bwd(g[i], a[i], b[i]);
    da[i] = r.gate;
    db[i] = r.up;
  }
}

template <class T>
static void widen(const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

template <class T>
static void narrow(const float* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(x[i]);
}

// bfloat16 by its bits: c10's conversions (round to nearest even, NaN -> 0x7fc0) written as
// integer operations the compiler vectorises; c10's own went element by element, which made the
// bfloat16 loops slower than the float32 ones at half the bytes.
template <>
void widen<c10::BFloat16>(const c10::BFloat16* x, float* y, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < n; ++i) y[i] = kernels::bits_float(static_cast<uint32_t>(bits[i]) << 16);
}

template <>
void narrow<c10::BFloat16>(const float* x, c10::BFloat16* y, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = kernels::float_bits(x[i]);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    bits[i] = static_cast<uint16_t>(x[i] != x[i] ? 0x7fc0u : rounded);
  }
}

template <class T>
static void fwd_16(const T* a, const T* b, T* out, int64_t n) {
  float fa[kBlock], fb[kBlock], fo[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = n - i < kBlock ? n - i : kBlock;
    widen(a + i, fa, m);
    widen(b + i, fb, m);
    fwd_f32(fa, fb, fo, m);
    narrow(fo, out + i, m);
  }
}

template <class T>
static void bwd_16(const T* g, const T* a, const T* b, T* da, T* db, int64_t n) {
  float fg[kBlock], fa[kBlock], fb[kBlock], fda[kBlock], fdb[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = n - i < kBlock ? n - i : kBlock;
    widen(g + i, fg, m);
    widen(a + i, fa, m);
    widen(b + i, fb, m);
    bwd_f32(fg, fa, fb, fda, fdb, m);
    narrow(fda, da + i, m);
    narrow(fdb, db + i, m);
  }
}

static SwigluLoops loops(const char* isa) {
  return {{fwd_f32, bwd_f32}, {fwd_16<c10::BFloat16>, bwd_16<c10::BFloat16>}, {fwd_16<c10::Half>, bwd_16<c10::Half>}, isa};
}

}  // namespace FF_SWIGLU_NS
}  // namespace fourm_fast
