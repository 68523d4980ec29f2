// Stand-in for csrc/cuda/ptx.cuh under the host emulation (cuda_emu.h): same names, same
// contracts, implemented by the emulator. The test stages the kernel sources with this file in
// place of the real one.
#pragma once

#include <cstdint>

#define FF_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#define FF_CUDA_SM80 1

namespace fourm_fast {
namespace cuda_ptx {

inline void cp_async_16(void* smem, const void* gmem, bool valid) { emu::cp_async_16(smem, gmem, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::cp_async_wait(kPending);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { emu::ldmatrix_x4(r, smem_row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { emu::ldmatrix_x4(r, smem_row, true); }

template <bool kBf16>
inline void mma_16x8x16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma_16x8x16<kBf16>(acc, a, b);
}

template <bool kBf16>
inline uint32_t pack2(float lo, float hi) {
  const uint16_t l = kBf16 ? emu::float_to_bf16(lo) : emu::float_to_fp16(lo);
  const uint16_t h = kBf16 ? emu::float_to_bf16(hi) : emu::float_to_fp16(hi);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

}  // namespace cuda_ptx
}  // namespace fourm_fast
