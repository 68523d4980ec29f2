// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator every fourm_fast op draws from. A (key, counter) pair maps to four
// independent 32-bit words with integer arithmetic only, so the CPU and the GPU produce the same
// bits for the same (seed, offset, row, index) without sharing any state.
#pragma once

#include "common.h"

namespace fourm_fast {
namespace kernels {

struct Philox4 {
  uint32_t v[4];
};

FF_INLINE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds of the Philox4x32 bijection of `counter` under `key`.
FF_INLINE Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0 = counter.v[0], c1 = counter.v[1], c2 = counter.v[2], c3 = counter.v[3];
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kMul0, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(kMul1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  Philox4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// The stream layout shared by all ops: key = seed; counter = (index / 4, row, offset lo, offset hi);
// element index % 4 of the output block is the word for `index`.
FF_INLINE Philox4 philox_block(uint64_t seed, uint64_t offset, uint32_t row, uint32_t block) {
  Philox4 ctr;
  ctr.v[0] = block;
  ctr.v[1] = row;
  ctr.v[2] = static_cast<uint32_t>(offset);
  ctr.v[3] = static_cast<uint32_t>(offset >> 32);
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FF_INLINE uint32_t philox_word(uint64_t seed, uint64_t offset, uint32_t row, uint32_t index) {
  return philox_block(seed, offset, row, index >> 2).v[index & 3u];
}

// Uniform in the open interval (0, 1): the top 23 bits as an odd multiple of 2^-24, so every
// value is exact in fp32 and lies in [2^-24, 1 - 2^-24]. (Adding half a step to the top 24 bits
// rounds above 2^23 and gave exactly 1.0 for the largest.)
FF_INLINE float uniform_open01(uint32_t bits) {
  return static_cast<float>((bits >> 8) | 1u) * (1.0f / 16777216.0f);
}

}  // namespace kernels
}  // namespace fourm_fast
