// The masked_attention CUDA kernels (device code only; the design is described at the top of
// attention_cuda.cu, which includes this file and launches them). Kept apart from the host code so
// tests/cuda_emulation/ can compile these exact kernels as host C++ and run them without a GPU.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../kernels/attention_math.h"
#include "attention_tiles.cuh"
#include "ptx.cuh"

namespace fourm_fast {
namespace {  // included by one translation unit of the extension (attention_cuda.cu)

using attn_tiles::AttnMetaArgs;
using kernels::AttnKeyMeta;
using kernels::AttnQueryMeta;
using kernels::AttnTileBounds;

constexpr int kTile = 64;         // rows of a block's own tile; keys per streamed tile
constexpr int kMmaThreads = 128;  // 4 warps x 16 rows
constexpr int kMaxMmaD = 128;     // larger head dims take the SIMT path
constexpr int kSimtThreads = 256;
constexpr int kSimtChunk = 32;   // d per smem chunk of a dot product
constexpr int kSimtSlice = 64;   // output columns per block
constexpr int kSimtChunkPitch = kSimtChunk + 1;  // 16 different rows per load: distinct banks
constexpr int kSimtPPitch = 80;  // rows ty and ty + 1 of one warp land 16 banks apart
constexpr int kSimtSmemBytes =
    4 * (2 * kTile * kSimtChunkPitch + kTile * kSimtPPitch + kTile * kSimtSlice + 4 * kTile);
static_assert(kSimtSmemBytes == 54784, "documented above");

__device__ __forceinline__ float neg_inf() { return -kernels::positive_infinity_f32(); }

// An operand [B, H, N, d] as a base pointer and element strides.
struct Operand {
  const void* ptr;
  int64_t sb, sh, sn, sd;

  template <typename T>
  __device__ __forceinline__ const T* at(int64_t b, int64_t h) const {
    return static_cast<const T*>(ptr) + b * sb + h * sh;
  }
};

// Arguments of every kernel; each uses the fields its comment names. q_tiles / k_tiles count the
// tiles at the granularity the launched kernel uses, and q_bounds / k_bounds hold [B][tiles].
struct AttnArgs {
  Operand q, k, v;
  Operand dout;                  // backward
  void* out;                     // forward: [B, H, Nq, D]
  float* lse_out;                // forward: [B, H, Nq]
  const float* lse;              // backward: [B, H, Nq]
  const float* delta;            // backward: [B, H, Nq]
  void* dq;                      // backward: [B, H, Nq, D]
  void* dk;                      // backward: [B, H, Nk, D]
  void* dv;                      // backward: [B, H, Nk, D]
  AttnMetaArgs meta;
  const AttnTileBounds* q_bounds;
  const AttnTileBounds* k_bounds;
  int64_t H, Nq, Nk;
  int q_tiles, k_tiles;
  int D;       // head dim of the outputs
  int d_cols;  // tensor-core path: columns of the operands (D rounded up to 8 in a padded copy)
  int slices;  // SIMT path: column slices of kSimtSlice
  float scale;
};

// (b, h, tile, slice) of a block: blocks of one (b, h) are adjacent, so they share K/V in L2.
struct BlockPos {
  int64_t b, h, bh;
  int tile, slice;
};

__device__ __forceinline__ BlockPos block_pos(int64_t H, int tiles, int slices) {
  int64_t x = blockIdx.x;
  BlockPos p;
  p.slice = static_cast<int>(x % slices);
  x /= slices;
  p.tile = static_cast<int>(x % tiles);
  p.bh = x / tiles;
  p.b = p.bh / H;
  p.h = p.bh % H;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Per-tile bounds, one thread per (batch, tile), from the shared attn_*_tile_start / _add.
__global__ void tile_bounds_kernel(AttnMetaArgs meta, int64_t B, int64_t N, int tile, int tiles, bool keys,
                                   AttnTileBounds* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * tiles) return;
  const int64_t b = idx / tiles;
  const int64_t lo = (idx % tiles) * tile, hi = min(N, lo + tile);
  AttnTileBounds r;
  if (keys) {
    r = kernels::attn_key_tile_start(hi - lo == tile);
    for (int64_t j = lo; j < hi; ++j) kernels::attn_key_tile_add(r, attn_tiles::key_meta(meta, b, j, N));
  } else {
    r = kernels::attn_query_tile_start();
    for (int64_t i = lo; i < hi; ++i) kernels::attn_query_tile_add(r, attn_tiles::query_meta(meta, b, i, N));
  }
  out[idx] = r;
}

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32, one warp per (b, h, i) row.
template <typename scalar_t>
__global__ void delta_kernel(Operand o, Operand dout, int64_t H, int64_t Nq, int D, int64_t rows,
                             float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t i = row % Nq, bh = row / Nq;
  const scalar_t* op = o.at<scalar_t>(bh / H, bh % H) + i * o.sn;
  const scalar_t* gp = dout.at<scalar_t>(bh / H, bh % H) + i * dout.sn;
  float sum = 0.0f;
  for (int d = lane; d < D; d += 32) {
    sum += static_cast<float>(op[d * o.sd]) * static_cast<float>(gp[d * dout.sd]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) delta[row] = sum;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels.

template <int kD>
struct MmaCfg {
  static constexpr int kPitch = attn_tiles::tile_pitch<kD>();
  static constexpr int kTileElems = kTile * kPitch;  // one 64-row tile
  // dkdv streams query tiles of kBq rows: 32 at kD = 128 keeps dK, dV, P^T, dP^T in registers.
  static constexpr int kBq = kD > 64 ? 32 : 64;
  static constexpr int kBqElems = kBq * kPitch;
  // dq streams key tiles of kBk rows: 32 at kD = 128 keeps dQ, S and dP in registers.
  static constexpr int kBk = kD > 64 ? 32 : 64;
  static constexpr int kBkElems = kBk * kPitch;
  static constexpr int kQueryMetaWords = 4 * kBq;  // segment, limit, lse, delta of a query tile
  static constexpr int kFwdSmem = (5 * kTileElems) * 2 + 2 * 3 * kTile * 4;
  static constexpr int kDqSmem = (2 * kTileElems + 4 * kBkElems) * 2 + 2 * 3 * kBk * 4;
  static constexpr int kDkdvSmem = (2 * kTileElems + 4 * kBqElems) * 2 + 2 * kQueryMetaWords * 4;
  static_assert(kD % 16 == 0 && kD <= kMaxMmaD, "head dim tier");
  static_assert((kTileElems * 2) % 16 == 0 && (kBqElems * 2) % 16 == 0 && (kBkElems * 2) % 16 == 0,
                "16-byte aligned tiles");
};

// Metadata of keys [j0, j0 + kRows) into smem as [3][kRows] (valid, segment, rank; keys past Nk
// are invalid). Plain stores: the caller's next barrier publishes them.
template <int kRows>
__device__ __forceinline__ void stage_key_meta(const AttnArgs& a, int64_t b, int64_t j0, int32_t* dst) {
  const int tid = threadIdx.x;
  if (tid < kRows) {
    const AttnKeyMeta km = attn_tiles::key_meta(a.meta, b, j0 + tid, a.Nk);
    dst[tid] = km.valid;
    dst[kRows + tid] = km.segment;
    dst[2 * kRows + tid] = km.rank;
  }
}

template <int kRows>
__device__ __forceinline__ AttnKeyMeta staged_key_meta(const int32_t* src, int col) {
  return {src[col] != 0, src[kRows + col], src[2 * kRows + col]};
}

// Metadata of queries [i0, i0 + kRows) into smem as [4][kRows]: segment, limit (int32), then lse
// and delta (float, backward only). Queries past Nq get lse = -inf, which makes their P exactly 0,
// and delta = 0, which keeps dS = P (dP - delta) finite (their dO rows are zero-filled).
template <int kRows>
__device__ __forceinline__ void stage_query_meta(const AttnArgs& a, int64_t b, int64_t bh, int64_t i0,
                                                 int32_t* dst, bool with_lse) {
  const int tid = threadIdx.x;
  if (tid < kRows) {
    const int64_t i = i0 + tid;
    const AttnQueryMeta qm = attn_tiles::query_meta(a.meta, b, i, a.Nq);
    dst[tid] = qm.segment;
    dst[kRows + tid] = qm.limit;
    if (with_lse) {
      reinterpret_cast<float*>(dst)[2 * kRows + tid] = i < a.Nq ? a.lse[bh * a.Nq + i] : neg_inf();
      reinterpret_cast<float*>(dst)[3 * kRows + tid] = i < a.Nq ? a.delta[bh * a.Nq + i] : 0.0f;
    }
  }
}

// The 2-stage pipeline shared by the three kernels: `load(t, stage)` issues the copies of tile t
// of the other side, `compute(t, stage)` consumes them. The resident tile's copies (issued by the
// caller) join the first group. Waiting until one group is pending means tile t has landed; the
// barrier after compute frees its stage for the load two tiles later.
template <class Next, class Load, class Compute>
__device__ __forceinline__ void run_tiles(int count, Next&& next, Load&& load, Compute&& compute) {
  int t = next(0);
  if (t < count) load(t, 0);
  cuda_ptx::cp_async_commit();
  int stage = 0;
  while (t < count) {
    const int tn = next(t + 1);
    if (tn < count) load(tn, stage ^ 1);
    cuda_ptx::cp_async_commit();  // possibly empty: keeps the group count in step
    cuda_ptx::cp_async_wait<1>();
    __syncthreads();
    compute(t, stage);
    __syncthreads();
    t = tn;
    stage ^= 1;
  }
  cuda_ptx::cp_async_wait<0>();
  __syncthreads();  // the epilogue reuses smem
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kMmaThreads) attn_fwd_mma_kernel(const AttnArgs a) {
  using Cfg = MmaCfg<kD>;
  constexpr int P = Cfg::kPitch;
  FF_DYNAMIC_SMEM(smem);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem);
  const auto k_s = [&](int st) { return q_s + (1 + 2 * st) * Cfg::kTileElems; };
  const auto v_s = [&](int st) { return q_s + (2 + 2 * st) * Cfg::kTileElems; };
  const auto km_s = [&](int st) { return reinterpret_cast<int32_t*>(q_s + 5 * Cfg::kTileElems) + st * 3 * kTile; };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const BlockPos pos = block_pos(a.H, a.q_tiles, 1);
  const int64_t i0 = static_cast<int64_t>(pos.tile) * kTile;
  const uint16_t* kg = a.k.at<uint16_t>(pos.b, pos.h);
  const uint16_t* vg = a.v.at<uint16_t>(pos.b, pos.h);
  attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(q_s, a.q.at<uint16_t>(pos.b, pos.h), a.q.sn, i0, a.Nq,
                                                      a.d_cols);

  const bool hs = a.meta.has_segments, hr = a.meta.has_ranks;
  const int64_t row0 = i0 + warp * 16;  // this warp's rows: row0 + g and row0 + g + 8
  AttnQueryMeta qm[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) qm[h] = attn_tiles::query_meta(a.meta, pos.b, row0 + g + 8 * h, a.Nq);

  float o[kD / 8][4] = {};
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.0f, 0.0f};  // this lane's share of the row sums
  const AttnTileBounds mine = a.q_bounds[pos.b * a.q_tiles + pos.tile];
  const AttnTileBounds* others = a.k_bounds + pos.b * a.k_tiles;
  const float scale2 = a.scale * kernels::kAttnLog2e;

  run_tiles(
      a.k_tiles,
      [&](int from) { return attn_tiles::next_meeting_tile(others, from, a.k_tiles, mine, true, hs, hr); },
      [&](int t, int st) {
        const int64_t j0 = static_cast<int64_t>(t) * kTile;
        attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(k_s(st), kg, a.k.sn, j0, a.Nk, a.d_cols);
        attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(v_s(st), vg, a.v.sn, j0, a.Nk, a.d_cols);
        stage_key_meta<kTile>(a, pos.b, j0, km_s(st));
      },
      [&](int t, int st) {
        float s[kTile / 8][4] = {};
        attn_tiles::warp_mma_nt<kBf16, kD, kTile>(s, q_s + warp * 16 * P, P, k_s(st), P, lane);
        // Scores in base 2 (x = s * scale * log2 e, p = 2^(x - max)); invisible ones become -inf.
        // A tile that the bounds prove fully visible skips the per-element rule (block-uniform).
        float tmax[2] = {neg_inf(), neg_inf()};
        if (kernels::attn_tiles_all_visible(mine, others[t], hs, hr)) {
#pragma unroll
          for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              s[nt][e] *= scale2;
              tmax[e >> 1] = fmaxf(tmax[e >> 1], s[nt][e]);
            }
          }
        } else {
#pragma unroll
          for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const AttnKeyMeta km = staged_key_meta<kTile>(km_s(st), nt * 8 + 2 * c4 + e);
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                float& x = s[nt][2 * h + e];
                x = kernels::attn_visible(qm[h], km, hs, hr) ? x * scale2 : neg_inf();
                tmax[h] = fmaxf(tmax[h], x);
              }
            }
          }
        }
        // Online softmax: rescale what was accumulated under the old row maximum. While a row has
        // seen nothing (max -inf) it subtracts 0 instead, so -inf scores give 0, never NaN.
        float alpha[2], sub[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m_new = fmaxf(m[h], attn_tiles::quad_max(tmax[h]));
          sub[h] = m_new == neg_inf() ? 0.0f : m_new;
          alpha[h] = exp2f(m[h] - sub[h]);  // m = -inf -> 0
          m[h] = m_new;
          l[h] *= alpha[h];
        }
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float& x = s[nt][e];
            x = exp2f(x - sub[e >> 1]);
            l[e >> 1] += x;
          }
        }
#pragma unroll
        for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
        }
        attn_tiles::warp_mma_rn<kBf16, kTile, kD>(o, s, v_s(st), P, lane);
      });

  float inv[2];
  float lse_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = attn_tiles::quad_sum(l[h]);
    lse_row[h] = kernels::attn_lse_from2(m[h], sum);
    inv[h] = sum > 0.0f ? 1.0f / sum : 0.0f;  // a query that sees nothing outputs zeros
  }
  uint16_t* rows = q_s + warp * 16 * P;  // only this warp ever read these Q rows
  attn_tiles::stage_warp_rows<kBf16, kD>(rows, o, inv[0], inv[1], lane);
  __syncwarp();
  attn_tiles::store_warp_rows<kD>(static_cast<uint16_t*>(a.out) + pos.bh * a.Nq * a.D, row0, a.Nq, a.D, rows, lane);
  if (c4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = row0 + g + 8 * h;
      if (i < a.Nq) a.lse_out[pos.bh * a.Nq + i] = lse_row[h];
    }
  }
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kMmaThreads) attn_bwd_dq_mma_kernel(const AttnArgs a) {
  using Cfg = MmaCfg<kD>;
  constexpr int P = Cfg::kPitch;
  FF_DYNAMIC_SMEM(smem);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* do_s = q_s + Cfg::kTileElems;
  constexpr int kBk = Cfg::kBk;
  const auto k_s = [&](int st) { return q_s + 2 * Cfg::kTileElems + 2 * st * Cfg::kBkElems; };
  const auto v_s = [&](int st) { return q_s + 2 * Cfg::kTileElems + (2 * st + 1) * Cfg::kBkElems; };
  const auto km_s = [&](int st) {
    return reinterpret_cast<int32_t*>(q_s + 2 * Cfg::kTileElems + 4 * Cfg::kBkElems) + st * 3 * kBk;
  };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const BlockPos pos = block_pos(a.H, a.q_tiles, 1);
  const int64_t i0 = static_cast<int64_t>(pos.tile) * kTile;
  const uint16_t* kg = a.k.at<uint16_t>(pos.b, pos.h);
  const uint16_t* vg = a.v.at<uint16_t>(pos.b, pos.h);
  attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(q_s, a.q.at<uint16_t>(pos.b, pos.h), a.q.sn, i0, a.Nq,
                                                      a.d_cols);
  attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(do_s, a.dout.at<uint16_t>(pos.b, pos.h), a.dout.sn, i0,
                                                      a.Nq, a.d_cols);

  const bool hs = a.meta.has_segments, hr = a.meta.has_ranks;
  const int64_t row0 = i0 + warp * 16;
  AttnQueryMeta qm[2];
  float lse[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = row0 + g + 8 * h;
    qm[h] = attn_tiles::query_meta(a.meta, pos.b, i, a.Nq);
    lse[h] = i < a.Nq ? a.lse[pos.bh * a.Nq + i] : neg_inf();
    delta[h] = i < a.Nq ? a.delta[pos.bh * a.Nq + i] : 0.0f;
  }

  float dq[kD / 8][4] = {};
  const AttnTileBounds mine = a.q_bounds[pos.b * a.q_tiles + pos.tile];
  const AttnTileBounds* others = a.k_bounds + pos.b * a.k_tiles;
  const float scale2 = a.scale * kernels::kAttnLog2e;
  const float lse2[2] = {lse[0] * kernels::kAttnLog2e, lse[1] * kernels::kAttnLog2e};  // -inf stays -inf

  run_tiles(
      a.k_tiles,
      [&](int from) { return attn_tiles::next_meeting_tile(others, from, a.k_tiles, mine, true, hs, hr); },
      [&](int t, int st) {
        const int64_t j0 = static_cast<int64_t>(t) * kBk;
        attn_tiles::copy_tile_async<kBk, kD, kMmaThreads>(k_s(st), kg, a.k.sn, j0, a.Nk, a.d_cols);
        attn_tiles::copy_tile_async<kBk, kD, kMmaThreads>(v_s(st), vg, a.v.sn, j0, a.Nk, a.d_cols);
        stage_key_meta<kBk>(a, pos.b, j0, km_s(st));
      },
      [&](int t, int st) {
        float s[kBk / 8][4] = {};
        float dp[kBk / 8][4] = {};
        attn_tiles::warp_mma_nt<kBf16, kD, kBk>(s, q_s + warp * 16 * P, P, k_s(st), P, lane);
        attn_tiles::warp_mma_nt<kBf16, kD, kBk>(dp, do_s + warp * 16 * P, P, v_s(st), P, lane);
        if (kernels::attn_tiles_all_visible(mine, others[t], hs, hr)) {  // block-uniform
#pragma unroll
          for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float p = kernels::attn_prob2(s[nt][e] * scale2, lse2[e >> 1]);
              s[nt][e] = kernels::attn_dscore(p, dp[nt][e], delta[e >> 1]);
            }
          }
        } else {
#pragma unroll
          for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const AttnKeyMeta km = staged_key_meta<kBk>(km_s(st), nt * 8 + 2 * c4 + e);
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                float& x = s[nt][2 * h + e];
                const float p =
                    kernels::attn_visible(qm[h], km, hs, hr) ? kernels::attn_prob2(x * scale2, lse2[h]) : 0.0f;
                x = kernels::attn_dscore(p, dp[nt][2 * h + e], delta[h]);
              }
            }
          }
        }
        attn_tiles::warp_mma_rn<kBf16, kBk, kD>(dq, s, k_s(st), P, lane);
      });

  uint16_t* rows = q_s + warp * 16 * P;
  attn_tiles::stage_warp_rows<kBf16, kD>(rows, dq, a.scale, a.scale, lane);
  __syncwarp();
  attn_tiles::store_warp_rows<kD>(static_cast<uint16_t*>(a.dq) + pos.bh * a.Nq * a.D, row0, a.Nq, a.D, rows, lane);
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kMmaThreads) attn_bwd_dkdv_mma_kernel(const AttnArgs a) {
  using Cfg = MmaCfg<kD>;
  constexpr int P = Cfg::kPitch;
  constexpr int kBq = Cfg::kBq;
  FF_DYNAMIC_SMEM(smem);
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* v_s = k_s + Cfg::kTileElems;
  const auto q_s = [&](int st) { return k_s + 2 * Cfg::kTileElems + 2 * st * Cfg::kBqElems; };
  const auto do_s = [&](int st) { return k_s + 2 * Cfg::kTileElems + (2 * st + 1) * Cfg::kBqElems; };
  // Per stage: segment, limit (int32) then lse, delta (float), kBq each.
  const auto qm_s = [&](int st) {
    return reinterpret_cast<int32_t*>(k_s + 2 * Cfg::kTileElems + 4 * Cfg::kBqElems) + st * Cfg::kQueryMetaWords;
  };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const BlockPos pos = block_pos(a.H, a.k_tiles, 1);
  const int64_t j0 = static_cast<int64_t>(pos.tile) * kTile;
  const uint16_t* qg = a.q.at<uint16_t>(pos.b, pos.h);
  const uint16_t* dog = a.dout.at<uint16_t>(pos.b, pos.h);
  attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(k_s, a.k.at<uint16_t>(pos.b, pos.h), a.k.sn, j0, a.Nk,
                                                      a.d_cols);
  attn_tiles::copy_tile_async<kTile, kD, kMmaThreads>(v_s, a.v.at<uint16_t>(pos.b, pos.h), a.v.sn, j0, a.Nk,
                                                      a.d_cols);

  const bool hs = a.meta.has_segments, hr = a.meta.has_ranks;
  const int64_t krow0 = j0 + warp * 16;  // this warp's keys: krow0 + g and krow0 + g + 8
  AttnKeyMeta km[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) km[h] = attn_tiles::key_meta(a.meta, pos.b, krow0 + g + 8 * h, a.Nk);

  float dk[kD / 8][4] = {};
  float dv[kD / 8][4] = {};
  const AttnTileBounds mine = a.k_bounds[pos.b * a.k_tiles + pos.tile];
  const AttnTileBounds* others = a.q_bounds + pos.b * a.q_tiles;
  const float scale2 = a.scale * kernels::kAttnLog2e;

  run_tiles(
      a.q_tiles,
      [&](int from) { return attn_tiles::next_meeting_tile(others, from, a.q_tiles, mine, false, hs, hr); },
      [&](int t, int st) {
        const int64_t i0 = static_cast<int64_t>(t) * kBq;
        attn_tiles::copy_tile_async<kBq, kD, kMmaThreads>(q_s(st), qg, a.q.sn, i0, a.Nq, a.d_cols);
        attn_tiles::copy_tile_async<kBq, kD, kMmaThreads>(do_s(st), dog, a.dout.sn, i0, a.Nq, a.d_cols);
        stage_query_meta<kBq>(a, pos.b, pos.bh, i0, qm_s(st), true);
      },
      [&](int t, int st) {
        const int32_t* meta = qm_s(st);
        const float* lse_s = reinterpret_cast<const float*>(meta) + 2 * kBq;
        const float* delta_s = reinterpret_cast<const float*>(meta) + 3 * kBq;
        // Rows are this warp's 16 keys, columns the kBq queries of the tile.
        float pt[kBq / 8][4] = {};
        attn_tiles::warp_mma_nt<kBf16, kD, kBq>(pt, k_s + warp * 16 * P, P, q_s(st), P, lane);
        const bool full = kernels::attn_tiles_all_visible(others[t], mine, hs, hr);  // block-uniform
#pragma unroll
        for (int nt = 0; nt < kBq / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = nt * 8 + 2 * c4 + e;
            const AttnQueryMeta qm{meta[col], meta[kBq + col]};
            const float lse2 = lse_s[col] * kernels::kAttnLog2e;  // -inf stays -inf
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float& x = pt[nt][2 * h + e];
              x = full || kernels::attn_visible(qm, km[h], hs, hr) ? kernels::attn_prob2(x * scale2, lse2) : 0.0f;
            }
          }
        }
        attn_tiles::warp_mma_rn<kBf16, kBq, kD>(dv, pt, do_s(st), P, lane);
        float ds[kBq / 8][4] = {};
        attn_tiles::warp_mma_nt<kBf16, kD, kBq>(ds, v_s + warp * 16 * P, P, do_s(st), P, lane);
#pragma unroll
        for (int nt = 0; nt < kBq / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            ds[nt][e] = kernels::attn_dscore(pt[nt][e], ds[nt][e], delta_s[nt * 8 + 2 * c4 + (e & 1)]);
          }
        }
        attn_tiles::warp_mma_rn<kBf16, kBq, kD>(dk, ds, q_s(st), P, lane);
      });

  // Only this warp ever read these K and V rows.
  uint16_t* k_rows = k_s + warp * 16 * P;
  uint16_t* v_rows = v_s + warp * 16 * P;
  attn_tiles::stage_warp_rows<kBf16, kD>(k_rows, dk, a.scale, a.scale, lane);
  attn_tiles::stage_warp_rows<kBf16, kD>(v_rows, dv, 1.0f, 1.0f, lane);
  __syncwarp();
  const int64_t out_off = pos.bh * a.Nk * a.D;
  attn_tiles::store_warp_rows<kD>(static_cast<uint16_t*>(a.dk) + out_off, krow0, a.Nk, a.D, k_rows, lane);
  attn_tiles::store_warp_rows<kD>(static_cast<uint16_t*>(a.dv) + out_off, krow0, a.Nk, a.D, v_rows, lane);
}

// ---------------------------------------------------------------------------------------------
// SIMT kernels (fp32).

struct SimtSmem {
  float* a;  // [kTile][kSimtChunkPitch]
  float* b;  // [kTile][kSimtChunkPitch]
  float* p;  // [kTile][kSimtPPitch]: P, dS or their transposes
  float* v;  // [kTile][kSimtSlice]: a column slice of V, K, dO or Q
  int32_t* own_meta;  // [4][kTile]: metadata of the block's own tile (stage_key/query_meta)

  __device__ explicit SimtSmem(unsigned char* raw) {
    a = reinterpret_cast<float*>(raw);
    b = a + kTile * kSimtChunkPitch;
    p = b + kTile * kSimtChunkPitch;
    v = p + kTile * kSimtPPitch;
    own_meta = reinterpret_cast<int32_t*>(v + kTile * kSimtSlice);
  }
};

// dst[r][c] = x[row0 + r][col0 + c] for r < kTile, c < kCols; zero outside [nrows) x [D). Each
// thread keeps one column, so a warp reads 32 consecutive elements of a row (coalesced for d).
template <int kCols, int kPitch>
__device__ __forceinline__ void simt_load(float* dst, const float* x, int64_t sn, int64_t sd, int64_t row0,
                                          int64_t nrows, int col0, int D) {
  constexpr int kRowStep = kSimtThreads / kCols;
  static_assert(kSimtThreads % kCols == 0 && kTile % kRowStep == 0, "whole rows per pass");
  const int c = threadIdx.x % kCols, d = col0 + c;
  const int64_t col_off = static_cast<int64_t>(d) * sd;
#pragma unroll 4
  for (int pass = 0; pass < kTile / kRowStep; ++pass) {
    const int r = static_cast<int>(threadIdx.x) / kCols + pass * kRowStep;
    const int64_t n = row0 + r;
    dst[r * kPitch + c] = n < nrows && d < D ? x[n * sn + col_off] : 0.0f;
  }
}

// acc[i][j] = sum_d A[a_row0 + ty + 16 i][d] * B[b_row0 + tx + 16 j][d] over all D. Starts with a
// barrier, so callers may overwrite the chunk buffers' previous contents freely.
__device__ __forceinline__ void simt_nt(float (&acc)[4][4], const SimtSmem& sm, const float* A, int64_t a_sn,
                                        int64_t a_sd, int64_t a_row0, int64_t a_rows, const float* B, int64_t b_sn,
                                        int64_t b_sd, int64_t b_row0, int64_t b_rows, int D) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int d0 = 0; d0 < D; d0 += kSimtChunk) {
    __syncthreads();
    simt_load<kSimtChunk, kSimtChunkPitch>(sm.a, A, a_sn, a_sd, a_row0, a_rows, d0, D);
    simt_load<kSimtChunk, kSimtChunkPitch>(sm.b, B, b_sn, b_sd, b_row0, b_rows, d0, D);
    __syncthreads();
#pragma unroll 2
    for (int d = 0; d < kSimtChunk; ++d) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sm.a[(ty + 16 * i) * kSimtChunkPitch + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sm.b[(tx + 16 * j) * kSimtChunkPitch + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
}

// acc[i][j] += sum_k sm.p[ty + 16 i][k] * sm.v[k][tx + 16 j]; callers publish p and v first.
__device__ __forceinline__ void simt_nn(float (&acc)[4][4], const SimtSmem& sm) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 4
  for (int k = 0; k < kTile; ++k) {
    float pv[4], vv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pv[i] = sm.p[(ty + 16 * i) * kSimtPPitch + k];
#pragma unroll
    for (int j = 0; j < 4; ++j) vv[j] = sm.v[k * kSimtSlice + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(pv[i], vv[j], acc[i][j]);
  }
}

__device__ __forceinline__ void simt_store_p(const SimtSmem& sm, const float (&x)[4][4]) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sm.p[(ty + 16 * i) * kSimtPPitch + tx + 16 * j] = x[i][j];
}

// Reductions over the 16 threads that share a micro-tile row (one half-warp).
__device__ __forceinline__ float row16_max(float v) {
#pragma unroll
  for (int off = 1; off < 16; off <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float row16_sum(float v) {
#pragma unroll
  for (int off = 1; off < 16; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Rows [row0, +64) x columns [col0, +64) of a contiguous fp32 [nrows][D] output.
__device__ __forceinline__ void simt_store_out(float* out, int64_t row0, int64_t nrows, int col0, int D,
                                               const float (&x)[4][4], float mul) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t n = row0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = col0 + tx + 16 * j;
      if (n < nrows && d < D) out[n * D + d] = x[i][j] * mul;
    }
  }
}

__global__ void __launch_bounds__(kSimtThreads, 2) attn_fwd_simt_kernel(const AttnArgs a) {
  FF_DYNAMIC_SMEM(smem);
  const SimtSmem sm(smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const BlockPos pos = block_pos(a.H, a.q_tiles, a.slices);
  const int64_t i0 = static_cast<int64_t>(pos.tile) * kTile;
  const int col0 = pos.slice * kSimtSlice;
  const float* qg = a.q.at<float>(pos.b, pos.h);
  const float* kg = a.k.at<float>(pos.b, pos.h);
  const float* vg = a.v.at<float>(pos.b, pos.h);
  const bool hs = a.meta.has_segments, hr = a.meta.has_ranks;

  // The block's own metadata lives in smem (published by simt_nt's first barrier) rather than in
  // per-thread registers: these kernels must stay within 128 registers.
  stage_query_meta<kTile>(a, pos.b, pos.bh, i0, sm.own_meta, false);
  float o[4][4] = {};
  float m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = neg_inf();
    l[i] = 0.0f;
  }
  const AttnTileBounds mine = a.q_bounds[pos.b * a.q_tiles + pos.tile];
  const AttnTileBounds* others = a.k_bounds + pos.b * a.k_tiles;
  for (int t = attn_tiles::next_meeting_tile(others, 0, a.k_tiles, mine, true, hs, hr); t < a.k_tiles;
       t = attn_tiles::next_meeting_tile(others, t + 1, a.k_tiles, mine, true, hs, hr)) {
    const int64_t j0 = static_cast<int64_t>(t) * kTile;
    float s[4][4];
    simt_nt(s, sm, qg, a.q.sn, a.q.sd, i0, a.Nq, kg, a.k.sn, a.k.sd, j0, a.Nk, a.D);
    AttnKeyMeta km[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) km[j] = attn_tiles::key_meta(a.meta, pos.b, j0 + tx + 16 * j, a.Nk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      const AttnQueryMeta qm{sm.own_meta[r], sm.own_meta[kTile + r]};
      float tmax = neg_inf();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = kernels::attn_visible(qm, km[j], hs, hr) ? s[i][j] * a.scale : neg_inf();
        tmax = fmaxf(tmax, s[i][j]);
      }
      const float m_new = fmaxf(m[i], row16_max(tmax));
      const float alpha = m_new == neg_inf() ? 1.0f : expf(m[i] - m_new);
      m[i] = m_new;
      l[i] *= alpha;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = s[i][j] == neg_inf() ? 0.0f : expf(s[i][j] - m_new);
        l[i] += s[i][j];
        o[i][j] *= alpha;
      }
    }
    // simt_nt's barriers ordered the previous simt_nn before these writes.
    simt_store_p(sm, s);
    simt_load<kSimtSlice, kSimtSlice>(sm.v, vg, a.v.sn, a.v.sd, j0, a.Nk, col0, a.D);
    __syncthreads();
    simt_nn(o, sm);
  }
  float* out = static_cast<float*>(a.out) + pos.bh * a.Nq * a.D;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float sum = row16_sum(l[i]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int64_t n = i0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = col0 + tx + 16 * j;
      if (n < a.Nq && d < a.D) out[n * a.D + d] = o[i][j] * inv;
    }
    if (pos.slice == 0 && tx == 0 && n < a.Nq) a.lse_out[pos.bh * a.Nq + n] = kernels::attn_lse(m[i], sum);
  }
}

__global__ void __launch_bounds__(kSimtThreads, 2) attn_bwd_dq_simt_kernel(const AttnArgs a) {
  FF_DYNAMIC_SMEM(smem);
  const SimtSmem sm(smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const BlockPos pos = block_pos(a.H, a.q_tiles, a.slices);
  const int64_t i0 = static_cast<int64_t>(pos.tile) * kTile;
  const int col0 = pos.slice * kSimtSlice;
  const float* qg = a.q.at<float>(pos.b, pos.h);
  const float* kg = a.k.at<float>(pos.b, pos.h);
  const float* vg = a.v.at<float>(pos.b, pos.h);
  const float* dog = a.dout.at<float>(pos.b, pos.h);
  const bool hs = a.meta.has_segments, hr = a.meta.has_ranks;

  // The block's own metadata lives in smem (published by simt_nt's first barrier) rather than in
  // per-thread registers: these kernels must stay within 128 registers.
  stage_query_meta<kTile>(a, pos.b, pos.bh, i0, sm.own_meta, true);
  const float* lse = reinterpret_cast<const float*>(sm.own_meta) + 2 * kTile;
  const float* delta = reinterpret_cast<const float*>(sm.own_meta) + 3 * kTile;
  float dq[4][4] = {};
  const AttnTileBounds mine = a.q_bounds[pos.b * a.q_tiles + pos.tile];
  const AttnTileBounds* others = a.k_bounds + pos.b * a.k_tiles;
  for (int t = attn_tiles::next_meeting_tile(others, 0, a.k_tiles, mine, true, hs, hr); t < a.k_tiles;
       t = attn_tiles::next_meeting_tile(others, t + 1, a.k_tiles, mine, true, hs, hr)) {
    const int64_t j0 = static_cast<int64_t>(t) * kTile;
    float s[4][4], dp[4][4];
    simt_nt(s, sm, qg, a.q.sn, a.q.sd, i0, a.Nq, kg, a.k.sn, a.k.sd, j0, a.Nk, a.D);
    simt_nt(dp, sm, dog, a.dout.sn, a.dout.sd, i0, a.Nq, vg, a.v.sn, a.v.sd, j0, a.Nk, a.D);
    AttnKeyMeta km[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) km[j] = attn_tiles::key_meta(a.meta, pos.b, j0 + tx + 16 * j, a.Nk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      const AttnQueryMeta qm{sm.own_meta[r], sm.own_meta[kTile + r]};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = kernels::attn_visible(qm, km[j], hs, hr) ? kernels::attn_prob(s[i][j] * a.scale, lse[r]) : 0.0f;
        s[i][j] = kernels::attn_dscore(p, dp[i][j], delta[r]);
      }
    }
    simt_store_p(sm, s);
    simt_load<kSimtSlice, kSimtSlice>(sm.v, kg, a.k.sn, a.k.sd, j0, a.Nk, col0, a.D);
    __syncthreads();
    simt_nn(dq, sm);
  }
  simt_store_out(static_cast<float*>(a.dq) + pos.bh * a.Nq * a.D, i0, a.Nq, col0, a.D, dq, a.scale);
}

__global__ void __launch_bounds__(kSimtThreads, 2) attn_bwd_dkdv_simt_kernel(const AttnArgs a) {
  FF_DYNAMIC_SMEM(smem);
  const SimtSmem sm(smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const BlockPos pos = block_pos(a.H, a.k_tiles, a.slices);
  const int64_t j0 = static_cast<int64_t>(pos.tile) * kTile;
  const int col0 = pos.slice * kSimtSlice;
  const float* qg = a.q.at<float>(pos.b, pos.h);
  const float* kg = a.k.at<float>(pos.b, pos.h);
  const float* vg = a.v.at<float>(pos.b, pos.h);
  const float* dog = a.dout.at<float>(pos.b, pos.h);
  const bool hs = a.meta.has_segments, hr = a.meta.has_ranks;

  // The block's own metadata lives in smem (published by simt_nt's first barrier) rather than in
  // per-thread registers: these kernels must stay within 128 registers.
  stage_key_meta<kTile>(a, pos.b, j0, sm.own_meta);
  float dk[4][4] = {}, dv[4][4] = {};
  const AttnTileBounds mine = a.k_bounds[pos.b * a.k_tiles + pos.tile];
  const AttnTileBounds* others = a.q_bounds + pos.b * a.q_tiles;
  for (int t = attn_tiles::next_meeting_tile(others, 0, a.q_tiles, mine, false, hs, hr); t < a.q_tiles;
       t = attn_tiles::next_meeting_tile(others, t + 1, a.q_tiles, mine, false, hs, hr)) {
    const int64_t i0 = static_cast<int64_t>(t) * kTile;
    // Rows are keys (ty + 16 i), columns queries (tx + 16 j). P^T goes to smem at once (simt_nt
    // does not touch sm.p) so it is not held in registers across the second product; each thread
    // reads back only what it wrote.
    float st[4][4];
    simt_nt(st, sm, kg, a.k.sn, a.k.sd, j0, a.Nk, qg, a.q.sn, a.q.sd, i0, a.Nq, a.D);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = i0 + tx + 16 * j;
      const AttnQueryMeta qm = attn_tiles::query_meta(a.meta, pos.b, n, a.Nq);
      const float lse = n < a.Nq ? a.lse[pos.bh * a.Nq + n] : neg_inf();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const AttnKeyMeta km = staged_key_meta<kTile>(sm.own_meta, ty + 16 * i);
        st[i][j] = kernels::attn_visible(qm, km, hs, hr) ? kernels::attn_prob(st[i][j] * a.scale, lse) : 0.0f;
      }
    }
    simt_store_p(sm, st);
    simt_nt(st, sm, vg, a.v.sn, a.v.sd, j0, a.Nk, dog, a.dout.sn, a.dout.sd, i0, a.Nq, a.D);  // dP^T
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = i0 + tx + 16 * j;
      const float delta = n < a.Nq ? a.delta[pos.bh * a.Nq + n] : 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        st[i][j] = kernels::attn_dscore(sm.p[(ty + 16 * i) * kSimtPPitch + tx + 16 * j], st[i][j], delta);
      }
    }
    simt_load<kSimtSlice, kSimtSlice>(sm.v, dog, a.dout.sn, a.dout.sd, i0, a.Nq, col0, a.D);
    __syncthreads();
    simt_nn(dv, sm);
    __syncthreads();  // p and v are rewritten below
    simt_store_p(sm, st);
    simt_load<kSimtSlice, kSimtSlice>(sm.v, qg, a.q.sn, a.q.sd, i0, a.Nq, col0, a.D);
    __syncthreads();
    simt_nn(dk, sm);
  }
  const int64_t out_off = pos.bh * a.Nk * a.D;
  simt_store_out(static_cast<float*>(a.dk) + out_off, j0, a.Nk, col0, a.D, dk, a.scale);
  simt_store_out(static_cast<float*>(a.dv) + out_off, j0, a.Nk, col0, a.D, dv, 1.0f);
}

}  // namespace
}  // namespace fourm_fast
