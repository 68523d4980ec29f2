// Warp- and block-level building blocks of the masked_attention CUDA kernels
// (csrc/cuda/attention_cuda.cu): metadata access, tile skipping, and the tensor-core fragments.
//
// mma.m16n8k16 fragments (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and
// c = lane % 4:
//   A (16 x 16, row-major)  a[0] = (g, 2c..2c+1)  a[1] = (g+8, 2c..)  a[2] = (g, 2c+8..)  a[3] = (g+8, 2c+8..)
//   B (16 x 8, k x n)       b[0] = (k 2c..2c+1, n g)  b[1] = (k 2c+8..2c+9, n g)
//   C (16 x 8, fp32)        c[0..1] = (g, 2c..2c+1)   c[2..3] = (g+8, 2c..2c+1)
// so the C fragments of two adjacent n8 tiles are, element for element, the A fragment of one
// k16 step: scores computed in registers feed the next product without a trip through smem.
#pragma once

#include <cstdint>

#include "../kernels/attention_math.h"
#include "ptx.cuh"

namespace fourm_fast {
namespace attn_tiles {

using kernels::AttnKeyMeta;
using kernels::AttnQueryMeta;
using kernels::AttnTileBounds;

// ---------------------------------------------------------------------------------------------
// Metadata. Arrays are contiguous [B][N]; absent ones are null and their flag is false.
struct AttnMetaArgs {
  const bool* k_valid;
  const int32_t* q_segment;
  const int32_t* k_segment;
  const int32_t* q_limit;
  const int32_t* k_rank;
  bool has_segments;
  bool has_ranks;
};

// Queries past the end get neutral metadata: they are computed like any row and never stored.
__device__ __forceinline__ AttnQueryMeta query_meta(const AttnMetaArgs& m, int64_t b, int64_t i, int64_t Nq) {
  if (i >= Nq) return {0, 0};
  const int64_t at = b * Nq + i;
  return {m.has_segments ? m.q_segment[at] : 0, m.has_ranks ? m.q_limit[at] : 0};
}

// Keys past the end are invalid, so they are never visible.
__device__ __forceinline__ AttnKeyMeta key_meta(const AttnMetaArgs& m, int64_t b, int64_t j, int64_t Nk) {
  if (j >= Nk) return {false, 0, 0};
  const int64_t at = b * Nk + j;
  return {m.k_valid[at], m.has_segments ? m.k_segment[at] : 0, m.has_ranks ? m.k_rank[at] : 0};
}

// First tile t in [from, count) of the other side that may meet the block's own tile. All threads
// of a block evaluate it on the same data, so loops driven by it are block-uniform.
__device__ __forceinline__ int next_meeting_tile(const AttnTileBounds* __restrict__ others, int from, int count,
                                                 const AttnTileBounds& mine, bool mine_is_query, bool has_segments,
                                                 bool has_ranks) {
  for (int t = from; t < count; ++t) {
    const AttnTileBounds other = others[t];
    const bool meet = mine_is_query ? kernels::attn_tiles_may_meet(mine, other, has_segments, has_ranks)
                                    : kernels::attn_tiles_may_meet(other, mine, has_segments, has_ranks);
    if (meet) return t;
  }
  return count;
}

// Sums (or maxes) over the 4 lanes of a quad: the lanes that share a row of a C fragment.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// ---------------------------------------------------------------------------------------------
// 16-bit data.

using cuda_ptx::ldmatrix_x4_trans;
using cuda_ptx::pack2;

// Smem row pitch of a tile of head dim kD: 16 bytes past a multiple of 64, so the 8 row addresses
// of an ldmatrix phase fall in 8 distinct 16-byte bank groups.
template <int kD>
constexpr int tile_pitch() {
  return kD + 8;
}

// cp.async copy of rows [row0, row0 + kRows) of a [nrows][d_cols] operand (row stride sn elements,
// contiguous columns, 16-byte aligned rows) into a [kRows][kD + 8] smem tile. Rows past nrows and
// columns past d_cols (a multiple of 8) are zero-filled: zero keys and values contribute nothing,
// and, unlike garbage, never turn 0 * x into NaN.
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void copy_tile_async(uint16_t* dst, const uint16_t* base, int64_t sn, int64_t row0,
                                                int64_t nrows, int d_cols) {
  constexpr int kChunks = kD / 8;
  static_assert(kRows * kChunks % kThreads == 0, "whole copies per thread");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int s = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = s / kChunks, c = s % kChunks;
    const int64_t n = row0 + r;
    const bool ok = n < nrows && c * 8 < d_cols;
    cuda_ptx::cp_async_16(dst + r * tile_pitch<kD>() + c * 8, ok ? base + n * sn + c * 8 : base, ok);
  }
}

// acc[nt] (16 x kN) += A * B^T over k in [0, kK): A = 16 rows at `a` and B = kN rows at `b`, both
// row-major over k in smem (Q K^T, dO V^T and their transposes).
template <bool kBf16, int kK, int kN>
__device__ __forceinline__ void warp_mma_nt(float (&acc)[kN / 8][4], const uint16_t* a, int a_pitch, const uint16_t* b,
                                            int b_pitch, int lane) {
  static_assert(kK % 16 == 0 && kN % 16 == 0, "whole mma tiles");
#pragma unroll 2
  for (int kk = 0; kk < kK; kk += 16) {
    // A: lanes 0-15 address rows 0-15 at k 0, lanes 16-31 the same rows at k 8.
    uint32_t af[4];
    cuda_ptx::ldmatrix_x4(af, a + (lane & 15) * a_pitch + kk + (lane >> 4) * 8);
#pragma unroll
    for (int p = 0; p < kN / 16; ++p) {
      // B, two n8 tiles: lanes 0-7 / 8-15 address rows 0-7 at k 0 / 8, lanes 16-23 / 24-31 rows 8-15.
      uint32_t r[4];
      cuda_ptx::ldmatrix_x4(r, b + (p * 16 + (lane & 7) + ((lane >> 4) << 3)) * b_pitch + kk + ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      cuda_ptx::mma_16x8x16<kBf16>(acc[2 * p], af, b0);
      cuda_ptx::mma_16x8x16<kBf16>(acc[2 * p + 1], af, b1);
    }
  }
}

// acc[nt] (16 x kN) += P * B: P (16 x kK) is held as fp32 C fragments (p[kK / 8]) and rounded to
// 16 bits here; B is a row-major [kK][kN] smem tile at `b` (P V, dS K, P^T dO, dS^T Q).
template <bool kBf16, int kK, int kN>
__device__ __forceinline__ void warp_mma_rn(float (&acc)[kN / 8][4], const float (&p)[kK / 8][4], const uint16_t* b,
                                            int b_pitch, int lane) {
  static_assert(kK % 16 == 0 && kN % 16 == 0, "whole mma tiles");
#pragma unroll
  for (int kt = 0; kt < kK / 16; ++kt) {
    const uint32_t af[4] = {pack2<kBf16>(p[2 * kt][0], p[2 * kt][1]), pack2<kBf16>(p[2 * kt][2], p[2 * kt][3]),
                            pack2<kBf16>(p[2 * kt + 1][0], p[2 * kt + 1][1]),
                            pack2<kBf16>(p[2 * kt + 1][2], p[2 * kt + 1][3])};
    // Matrix m = lane / 8 covers k rows kt*16 + (m % 2) * 8 .. +8 and n columns (m / 2) * 8 .. +8
    // of each 16-column pair: r[0..1] are the B fragment of the first n8 tile, r[2..3] the second.
    const int m = lane >> 3;
    const uint16_t* row = b + (kt * 16 + (m & 1) * 8 + (lane & 7)) * b_pitch + (m >> 1) * 8;
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t r[4];
      ldmatrix_x4_trans(r, row + np * 16);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      cuda_ptx::mma_16x8x16<kBf16>(acc[2 * np], af, b0);
      cuda_ptx::mma_16x8x16<kBf16>(acc[2 * np + 1], af, b1);
    }
  }
}

// Writes a warp's 16 x kD accumulator, row g scaled by mul[0] and row g + 8 by mul[1], as 16-bit
// values into 16 smem rows (pitch kD + 8) for a coalesced store.
template <bool kBf16, int kD>
__device__ __forceinline__ void stage_warp_rows(uint16_t* rows, const float (&acc)[kD / 8][4], float mul0, float mul1,
                                                int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
    *reinterpret_cast<uint32_t*>(rows + g * tile_pitch<kD>() + dt * 8 + 2 * c) =
        pack2<kBf16>(acc[dt][0] * mul0, acc[dt][1] * mul0);
    *reinterpret_cast<uint32_t*>(rows + (g + 8) * tile_pitch<kD>() + dt * 8 + 2 * c) =
        pack2<kBf16>(acc[dt][2] * mul1, acc[dt][3] * mul1);
  }
}

// Copies 16 staged smem rows to rows [row0, row0 + 16) of a contiguous [nrows][D] output, in
// 16-byte pieces when D allows it (the output is a fresh allocation, so 16-byte aligned).
template <int kD>
__device__ __forceinline__ void store_warp_rows(uint16_t* out, int64_t row0, int64_t nrows, int D,
                                                const uint16_t* rows, int lane) {
  constexpr int kChunks = kD / 8;
  for (int s = lane; s < 16 * kChunks; s += 32) {
    const int r = s / kChunks, col = (s % kChunks) * 8;
    const int64_t n = row0 + r;
    if (n >= nrows || col >= D) continue;
    const uint16_t* src = rows + r * tile_pitch<kD>() + col;
    uint16_t* dst = out + n * D + col;
    if (D % 8 == 0) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && col + e < D; ++e) dst[e] = src[e];
    }
  }
}

}  // namespace attn_tiles
}  // namespace fourm_fast
