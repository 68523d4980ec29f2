// CUDA executor of masked_attention (forward and backward). Semantics match
// csrc/cpu/attention_cpu.cpp: visibility from O(N) metadata (attn_visible), lse saved by the
// forward pass (-inf and zero output for a query that sees no key), probabilities recomputed from
// lse in the backward pass (attn_prob, or its base-2 form attn_prob2 in the tensor-core kernels;
// attn_dscore), all in fp32.
//
// Tile skipping. A small kernel computes AttnTileBounds per (batch, tile) of queries and of keys
// (attn_*_tile_start / _add); every block owns one tile of one side and walks only the tiles
// of the other side that attn_tiles_may_meet admits. The walk is block-uniform (all threads scan
// the same bounds), and a block that meets nothing still writes its zeros (and lse = -inf).
// Tiles that attn_tiles_all_visible proves fully visible (the full tiles of an unpadded encoder,
// the inside of a decoder image modality) skip the per-element rule in the
// tensor-core kernels. Those kernels exponentiate in base 2 (attn_prob2: scale * log2 e folded
// into the scores, one ex2 per probability); lse is stored in natural log, as the CPU stores it.
//
// Tensor-core path (bf16 / fp16, head dim up to 128, templated on kD = 32, 64 or 128; sm80+):
// 128 threads = 4 warps, every warp owns 16 rows of the block's 64-row tile; the other side is
// streamed through a 2-stage cp.async pipeline. mma.m16n8k16 with fp32 accumulators; scores stay
// in registers and feed the second product as A fragments (rounded to the input dtype there, as
// flash attention does). Operands are read straight from q, k, v when rows are 16-byte aligned
// with contiguous d (d % 8 == 0); otherwise a zero-padded contiguous copy is made (O(N*d)).
//  - forward: block = 64 queries; per 64-key tile S = Q K^T, mask, online softmax, O += P V.
//  - backward, two deterministic kernels (no atomics, no fp32 dq workspace; 7 matrix products
//    per tile pair instead of flash attention's 5, the price of writing every gradient once):
//      dq:   block = 64 queries; per key tile S, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//      dkdv: block = 64 keys; per query tile S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
//            dS^T, dK += dS^T Q.
//    Their streamed tiles are 64 rows, 32 at kD = 128 so that the accumulators stay in registers.
//    delta = rowsum(dO * O) is computed first by its own kernel.
//  Dynamic smem (bytes), kD = 32 / 64 / 128: fwd 27,136 / 47,616 / 88,576; dq 32,256 / 56,832 /
//  70,400; dkdv 32,768 / 57,344 / 70,656 (opt-in above 48 KiB; sm80 allows 163 KiB).
//
// SIMT path (fp32; also bf16 / fp16 with head dim > 128, run on fp32 copies): 256 threads as
// 16 x 16, 64 x 64 tiles, each thread a 4 x 4 micro-tile (rows ty + 16 i, columns tx + 16 j).
// Dot products over d stream the operands through smem in chunks of 32 (any d, any strides);
// outputs are produced in column slices of 64 (blockIdx carries the slice), so registers stay
// bounded for every d at the cost of recomputing scores once per extra slice. Same three kernels
// and the same algebra as the tensor-core path, with P and dS kept in fp32. Smem: 54,784 bytes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../attention_checks.h"
#include "../kernels/attention_math.h"
#include "attention_tiles.cuh"
#include "ptx.cuh"

namespace fourm_fast {
namespace {

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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Operand make_operand(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Contiguous metadata (O(N) copies when a view is strided) and the kernels' view of it.
struct MetaHolder {
  at::Tensor valid, qseg, kseg, qlim, krank;
  AttnMetaArgs args{};

  explicit MetaHolder(const AttnInputs& in) {
    valid = in.k_valid.contiguous();
    args.k_valid = valid.const_data_ptr<bool>();
    args.has_segments = in.has_segments;
    args.has_ranks = in.has_ranks;
    if (in.has_segments) {
      qseg = in.q_segment.contiguous();
      kseg = in.k_segment.contiguous();
      args.q_segment = qseg.const_data_ptr<int32_t>();
      args.k_segment = kseg.const_data_ptr<int32_t>();
    }
    if (in.has_ranks) {
      qlim = in.q_limit.contiguous();
      krank = in.k_rank.contiguous();
      args.q_limit = qlim.const_data_ptr<int32_t>();
      args.k_rank = krank.const_data_ptr<int32_t>();
    }
  }
};

void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "masked_attention (CUDA): ", what, " needs ", blocks,
                    " thread blocks, more than the supported 2^31 - 1; split the batch");
}

// AttnTileBounds of every (batch, tile) of one side, as raw bytes on the device.
at::Tensor tile_bounds(const AttnInputs& in, const AttnMetaArgs& meta, bool keys, int tile, cudaStream_t stream) {
  const int64_t N = keys ? in.Nk : in.Nq;
  const int64_t tiles = ceil_div(N, tile);
  at::Tensor bytes = at::empty({in.B * tiles * static_cast<int64_t>(sizeof(AttnTileBounds))},
                               in.q.options().dtype(at::kByte));
  constexpr int kThreads = 128;
  const int64_t count = in.B * tiles;
  if (count == 0) return bytes;
  check_grid(ceil_div(count, kThreads), keys ? "the key tile bounds" : "the query tile bounds");
  tile_bounds_kernel<<<static_cast<unsigned>(ceil_div(count, kThreads)), kThreads, 0, stream>>>(
      meta, in.B, N, tile, static_cast<int>(tiles), keys, reinterpret_cast<AttnTileBounds*>(bytes.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bytes;
}

const AttnTileBounds* bounds_ptr(const at::Tensor& t) {
  return reinterpret_cast<const AttnTileBounds*>(t.const_data_ptr());
}

// Tensor-core operands need contiguous d, 16-byte aligned rows and d % 8 == 0; anything else gets
// a zero-padded contiguous copy.
at::Tensor mma_operand(const at::Tensor& t) {
  const int64_t D = t.size(3);
  bool ok = D % 8 == 0 && t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  if (ok) return t;
  at::Tensor padded = at::zeros({t.size(0), t.size(1), t.size(2), ceil_div(D, 8) * 8}, t.options());
  padded.narrow(3, 0, D).copy_(t);
  return padded;
}

template <class Kernel>
void launch(Kernel kernel, int64_t blocks, int threads, int smem, const AttnArgs& args, cudaStream_t stream,
            const char* what) {
  check_grid(blocks, what);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= static_cast<int>(prop->sharedMemPerBlockOptin), "masked_attention (CUDA): ", what, " needs ",
              smem, " bytes of shared memory per block, this GPU allows ", prop->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(std::integral_constant<int, kD>) for the tensor-core head-dim tier of D (<= 128).
template <class F>
void dispatch_head_dim(int64_t D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

// Fields shared by every launch; the caller fills tensors, bounds and tile counts.
AttnArgs base_args(const AttnInputs& in, const MetaHolder& meta, double scale) {
  AttnArgs a{};
  a.meta = meta.args;
  a.H = in.H;
  a.Nq = in.Nq;
  a.Nk = in.Nk;
  a.D = static_cast<int>(in.D);
  a.slices = static_cast<int>(ceil_div(in.D, kSimtSlice));
  a.scale = static_cast<float>(scale);
  return a;
}

void check_cuda_inputs(const AttnInputs& in) {
  TORCH_CHECK_VALUE(in.q.is_cuda(), "masked_attention (CUDA): inputs must be CUDA tensors, got ", in.q.device());
  TORCH_CHECK_VALUE(in.Nq < INT32_MAX - kTile && in.Nk < INT32_MAX - kTile && in.D <= INT32_MAX,
                    "masked_attention (CUDA): at most 2^31 - 65 queries / keys and 2^31 - 1 head dims are "
                    "supported, got Nq = ", in.Nq, ", Nk = ", in.Nk, ", d = ", in.D);
}

// After the device guard: the properties are those of q's device.
void check_capability() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "masked_attention (CUDA): needs a GPU of compute capability 8.0 or newer (the "
              "kernels use cp.async and mma.sync), got ", prop->major, ".", prop->minor);
}

bool uses_tensor_cores(const AttnInputs& in) {
  return in.q.scalar_type() != at::kFloat && in.D <= kMaxMmaD;
}

// ---- forward ----

template <bool kBf16>
void forward_mma(const AttnInputs& in, const MetaHolder& meta, double scale, at::Tensor& out, at::Tensor& lse,
                 cudaStream_t stream) {
  const at::Tensor q = mma_operand(in.q), k = mma_operand(in.k), v = mma_operand(in.v);
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.d_cols = static_cast<int>(q.size(3));
  a.out = out.data_ptr();
  a.lse_out = lse.data_ptr<float>();
  a.q_bounds = bounds_ptr(qb);
  a.k_bounds = bounds_ptr(kb);
  a.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  dispatch_head_dim(in.D, [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    launch(attn_fwd_mma_kernel<kBf16, kD>, in.B * in.H * a.q_tiles, kMmaThreads, MmaCfg<kD>::kFwdSmem, a, stream,
           "the forward kernel");
  });
}

// fp32 SIMT forward; `out` is a contiguous fp32 tensor.
void forward_simt(const AttnInputs& in, const MetaHolder& meta, double scale, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.out = out.data_ptr();
  a.lse_out = lse.data_ptr<float>();
  a.q_bounds = bounds_ptr(qb);
  a.k_bounds = bounds_ptr(kb);
  a.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  launch(attn_fwd_simt_kernel, in.B * in.H * a.q_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a, stream,
         "the forward kernel");
}

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_valid,
    const std::optional<at::Tensor>& q_segment, const std::optional<at::Tensor>& k_segment,
    const std::optional<at::Tensor>& q_limit, const std::optional<at::Tensor>& k_rank, double scale) {
  const AttnInputs in = check_attention_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank);
  check_cuda_inputs(in);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_capability();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({in.B, in.H, in.Nq, in.D}, q.options());
  at::Tensor lse = at::empty({in.B, in.H, in.Nq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (in.Nk == 0) {  // no key at all: every query sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const MetaHolder meta(in);
  switch (q.scalar_type()) {
    case at::kBFloat16:
    case at::kHalf:
      if (uses_tensor_cores(in)) {
        if (q.scalar_type() == at::kBFloat16) {
          forward_mma<true>(in, meta, scale, out, lse, stream);
        } else {
          forward_mma<false>(in, meta, scale, out, lse, stream);
        }
      } else {  // head dim > 128: the SIMT kernels on fp32 copies
        at::Tensor out_f = at::empty({in.B, in.H, in.Nq, in.D}, q.options().dtype(at::kFloat));
        forward_simt(in, meta, scale, q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), out_f, lse, stream);
        out.copy_(out_f);
      }
      break;
    case at::kFloat:
      forward_simt(in, meta, scale, q, k, v, out, lse, stream);
      break;
    default:  // check_attention_inputs already rejected every other dtype
      TORCH_CHECK_TYPE(false, "masked_attention (CUDA): unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

// ---- backward ----

at::Tensor compute_delta(const AttnInputs& in, const at::Tensor& out, const at::Tensor& grad_out,
                         cudaStream_t stream) {
  at::Tensor delta = at::empty({in.B, in.H, in.Nq}, in.q.options().dtype(at::kFloat));
  const int64_t rows = in.B * in.H * in.Nq;
  constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
  const int64_t blocks = ceil_div(rows, kRowsPerBlock);
  check_grid(blocks, "the delta kernel");
  const Operand o = make_operand(out), g = make_operand(grad_out);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    delta_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(o, g, in.H, in.Nq, static_cast<int>(in.D),
                                                                            rows, delta.data_ptr<float>());
  };
  switch (out.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "masked_attention (CUDA): unsupported dtype ", out.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return delta;
}

template <bool kBf16>
void backward_mma(const AttnInputs& in, const MetaHolder& meta, double scale, const at::Tensor& grad_out,
                  const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  cudaStream_t stream) {
  const at::Tensor q = mma_operand(in.q), k = mma_operand(in.k), v = mma_operand(in.v), g = mma_operand(grad_out);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.dout = make_operand(g);
  a.d_cols = static_cast<int>(q.size(3));
  a.lse = lse.const_data_ptr<float>();
  a.delta = delta.const_data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.k_bounds = bounds_ptr(kb);
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  dispatch_head_dim(in.D, [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    using Cfg = MmaCfg<kD>;
    // dq walks key tiles of Cfg::kBk rows and dkdv query tiles of Cfg::kBq rows: bounds at those sizes.
    const at::Tensor kb_dq = Cfg::kBk == kTile ? kb : tile_bounds(in, meta.args, true, Cfg::kBk, stream);
    AttnArgs dq_args = a;
    dq_args.q_bounds = bounds_ptr(qb);
    dq_args.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
    dq_args.k_bounds = bounds_ptr(kb_dq);
    dq_args.k_tiles = static_cast<int>(ceil_div(in.Nk, Cfg::kBk));
    launch(attn_bwd_dq_mma_kernel<kBf16, kD>, in.B * in.H * dq_args.q_tiles, kMmaThreads, Cfg::kDqSmem, dq_args,
           stream, "the dq kernel");
    const at::Tensor qb_small = Cfg::kBq == kTile ? qb : tile_bounds(in, meta.args, false, Cfg::kBq, stream);
    AttnArgs kv_args = a;
    kv_args.q_bounds = bounds_ptr(qb_small);
    kv_args.q_tiles = static_cast<int>(ceil_div(in.Nq, Cfg::kBq));
    launch(attn_bwd_dkdv_mma_kernel<kBf16, kD>, in.B * in.H * a.k_tiles, kMmaThreads, Cfg::kDkdvSmem, kv_args,
           stream, "the dk/dv kernel");
  });
}

// fp32 SIMT backward into contiguous fp32 dq, dk, dv.
void backward_simt(const AttnInputs& in, const MetaHolder& meta, double scale, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& lse,
                   const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, cudaStream_t stream) {
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.dout = make_operand(grad_out);
  a.lse = lse.const_data_ptr<float>();
  a.delta = delta.const_data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.q_bounds = bounds_ptr(qb);
  a.k_bounds = bounds_ptr(kb);
  a.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  launch(attn_bwd_dq_simt_kernel, in.B * in.H * a.q_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a, stream,
         "the dq kernel");
  launch(attn_bwd_dkdv_simt_kernel, in.B * in.H * a.k_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a, stream,
         "the dk/dv kernel");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& k_valid, const std::optional<at::Tensor>& q_segment,
    const std::optional<at::Tensor>& k_segment, const std::optional<at::Tensor>& q_limit,
    const std::optional<at::Tensor>& k_rank, double scale) {
  const AttnInputs in = check_attention_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank);
  check_cuda_inputs(in);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "masked_attention backward: grad_out and out must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == in.B && lse.size(1) == in.H && lse.size(2) == in.Nq &&
                        lse.scalar_type() == at::kFloat,
                    "masked_attention backward: lse must be float32 (B, H, Nq)");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "masked_attention backward (CUDA): grad_out and out must have q's dtype ", q.scalar_type(),
                   ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "masked_attention backward: grad_out, out and lse must be on q's device ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_capability();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dq = at::empty({in.B, in.H, in.Nq, in.D}, q.options());
  at::Tensor dk = at::empty({in.B, in.H, in.Nk, in.D}, q.options());
  at::Tensor dv = at::empty({in.B, in.H, in.Nk, in.D}, q.options());
  if (dq.numel() == 0 || dk.numel() == 0) {  // no (query, key) pair: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const MetaHolder meta(in);
  const at::Tensor lse_c = lse.contiguous();
  if (uses_tensor_cores(in)) {
    const at::Tensor delta = compute_delta(in, out, grad_out, stream);
    if (q.scalar_type() == at::kBFloat16) {
      backward_mma<true>(in, meta, scale, grad_out, lse_c, delta, dq, dk, dv, stream);
    } else {
      backward_mma<false>(in, meta, scale, grad_out, lse_c, delta, dq, dk, dv, stream);
    }
  } else if (q.scalar_type() == at::kFloat) {
    const at::Tensor delta = compute_delta(in, out, grad_out, stream);
    backward_simt(in, meta, scale, q, k, v, grad_out, lse_c, delta, dq, dk, dv, stream);
  } else {  // bf16 / fp16 with head dim > 128: the SIMT kernels on fp32 copies
    const at::Tensor delta = compute_delta(in, out, grad_out, stream);
    at::Tensor dq_f = at::empty(dq.sizes(), q.options().dtype(at::kFloat));
    at::Tensor dk_f = at::empty(dk.sizes(), q.options().dtype(at::kFloat));
    at::Tensor dv_f = at::empty(dv.sizes(), q.options().dtype(at::kFloat));
    backward_simt(in, meta, scale, q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), grad_out.to(at::kFloat),
                  lse_c, delta, dq_f, dk_f, dv_f, stream);
    dq.copy_(dq_f);
    dk.copy_(dk_f);
    dv.copy_(dv_f);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) {
  m.impl("masked_attention_fwd", &masked_attention_fwd_cuda);
  m.impl("masked_attention_bwd", &masked_attention_bwd_cuda);
}

}  // namespace fourm_fast
