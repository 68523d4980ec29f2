// CUDA executor of vq_lookup: a tiled GEMM x * C'^T whose epilogue turns each dot product into a
// score (csrc/kernels/vq_math.h) and folds it into a running per-row argmin held in registers, so
// the N x K distance matrix never exists. Semantics match csrc/cpu/vq_cpu.cpp.
//
// Four launches, all on the current stream:
//  1. prepare: one thread per code (K rounded up to a tile) computes |c|^2 and the finite flag in
//     index order (the CPU's order, so the biases agree bit for bit), then writes the prepared code
//     c' = c * multiplier, zero-padded in D, and bias[K_pad]; padding codes get bias +inf.
//  2. search (one of two kernels), grid (row tiles, code splits), 256 threads, 3-stage cp.async
//     pipeline over the flattened (code tile, D chunk) sequence of the block's code range:
//     - tensor cores (bf16/fp16, sm80+): 128 rows x 128 codes per tile, D streamed in chunks of 32.
//       8 warps as 2 (rows) x 4 (codes); each warp owns 64 rows x 32 codes = 4 x 4 mma.m16n8k16
//       tiles (fp32 accumulators), fed by ldmatrix from smem rows padded to 40 elements (80 bytes,
//       so the 8 row addresses of an ldmatrix phase hit 8 distinct 16-byte bank groups). The
//       epilogue reads the accumulators straight from registers (the mma fragment layout is fixed
//       by PTX): each thread owns 8 rows x 8 codes of a tile. Smem: 3 x 20,992 B dynamic + 4 KiB.
//     - SIMT fp32 (also the pre-sm80 fallback for bf16/fp16, on fp32 copies): 128 x 128 tiles, D
//       chunks of 16; threads as 16 x 16, each an 8 x 8 micro-tile (rows ty*4+i and 64+ty*4+i,
//       codes tx*4+j and 64+tx*4+j) read as float4 from smem. x is staged transposed and padded
//       (x^T [D_pad][N_pad]) and c' is written transposed ([D_pad][K_pad]) by the prepare kernel,
//       so every copy is an aligned, unpredicated 16-byte cp.async. Smem: 3 x 16,896 B dynamic.
//     Every thread scans its codes in increasing index order with a strict '<', so it keeps the
//     smallest of tied indices; merges across threads (shuffles, then smem across warps for the
//     mma kernel) use vq_better. Each block writes one (score, index) candidate per row and split.
//  3. finalize: one thread per row merges the splits in order with vq_better, then maps a row
//     with a non-finite entry or no winner to (-1, NaN) and otherwise recomputes the distance
//     exactly from the original row and code (vq_exact_distance), like the CPU executor.
// Code splits exist so that small N still fills the GPU: with N = 65536 there is one split.
// Temporaries are O(K*D) (prepared codebook) and O(N*D + N*splits), never O(N*K).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kernels/vq_math.h"
#include "../vq_checks.h"
#include "ptx.cuh"

namespace fourm_fast {
namespace {

using kernels::VqMetric;

// ---------------------------------------------------------------------------------------------
// Tiling constants shared by both search kernels.
constexpr int kThreads = 256;
constexpr int kTileRows = 128;   // rows of x per block
constexpr int kTileCodes = 128;  // codes per tile; a block loops over all tiles of its split
constexpr int kStages = 3;       // cp.async pipeline depth
constexpr int kMinBlocksPerSm = 2;

// Tensor-core kernel.
constexpr int kMmaChunk = 32;              // D elements per pipeline step
constexpr int kMmaLd = kMmaChunk + 8;      // smem row pitch in elements (80 bytes, see top)
constexpr int kMmaWarpsN = 4;              // warps along the codes of a tile (2 along rows)
constexpr int kMmaWarpRows = 64;           // rows per warp: 4 m16 tiles
constexpr int kMmaWarpCodes = 32;          // codes per warp: 4 n8 tiles
constexpr int kMmaRowsPerThread = 8;       // 4 m16 tiles x {group, group + 8}
constexpr int kMmaStageBytes = 2 * kTileRows * kMmaLd * 2 + kTileCodes * 4;
constexpr int kMmaSmemBytes = kStages * kMmaStageBytes;

// SIMT kernel.
constexpr int kSimtChunk = 16;
constexpr int kSimtStageFloats = 2 * kSimtChunk * kTileRows + kTileCodes;
constexpr int kSimtSmemBytes = kStages * kSimtStageFloats * 4;

static_assert(kTileRows == kTileCodes, "the loaders share one segment mapping for x and codes");
static_assert(kTileRows * kMmaChunk / 8 == 2 * kThreads, "mma loader: 2 segments per thread");
static_assert(kSimtChunk * kTileRows / 4 == 2 * kThreads, "simt loader: 2 segments per thread");
static_assert(kMmaStageBytes % 16 == 0 && (kSimtStageFloats * 4) % 16 == 0, "stage alignment");
static_assert(kThreads / 32 == 2 * kMmaWarpsN, "mma warp grid is 2 x kMmaWarpsN");

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Arguments of a search kernel. Layouts differ per kernel (see the top comment).
struct VqSearchArgs {
  const void* x;       // mma: rows [n][x_ld] in the input dtype; simt: x^T [d_pad][x_ld] fp32
  const void* codes;   // mma: [k_pad][d_pad] in the input dtype; simt: [d_pad][k_pad] fp32
  const float* bias;   // [k_pad], +inf for padding and non-finite codes
  float* part_score;   // [splits][n]: best score of the split for each row
  int32_t* part_index; // [splits][n]: its code index, -1 when nothing was selected
  int64_t n;
  int64_t x_ld;        // mma: elements per row of x (multiple of 8, >= D); simt: padded N
  int64_t d_pad;       // D rounded up to the kernel's chunk
  int64_t k_pad;       // K rounded up to kTileCodes
  int num_chunks;      // d_pad / chunk
  int num_tiles;       // k_pad / kTileCodes
  int tiles_per_split;
  float scale;         // vq_score_scale(metric)
};

// The block's code tiles [begin, begin + steps / num_chunks), as pipeline steps.
struct TileRange {
  int begin;
  int steps;
};

__device__ __forceinline__ TileRange split_tiles(const VqSearchArgs& a) {
  const int begin = static_cast<int>(blockIdx.y) * a.tiles_per_split;
  const int end = min(a.num_tiles, begin + a.tiles_per_split);
  return {begin, max(end - begin, 0) * a.num_chunks};
}

// Multi-stage cp.async pipeline over `steps` steps. load(step, stage) issues the copies of one
// step into a stage buffer; consume(step, stage) reads it. Group g holds the copies of step g, so
// waiting until kStages - 2 groups are pending means step `it` has landed; the barrier then also
// guarantees every thread is done with stage (it - 1) % kStages, which the next load overwrites.
template <class Load, class Consume>
__device__ __forceinline__ void run_pipeline(int steps, Load&& load, Consume&& consume) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cuda_ptx::cp_async_commit();
  }
  for (int it = 0; it < steps; ++it) {
    cuda_ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = it + kStages - 1;
    if (next < steps) load(next, next % kStages);
    cuda_ptx::cp_async_commit();  // possibly empty: keeps the group count in step with `it`
    consume(it, it % kStages);
  }
  cuda_ptx::cp_async_wait<0>();
}

// Merges candidate (score, index) into (best_score, best_index) under vq_better's total order.
__device__ __forceinline__ void merge_candidate(float score, int32_t index, float& best_score,
                                                int32_t& best_index) {
  if (kernels::vq_better(score, index, best_score, best_index)) {
    best_score = score;
    best_index = index;
  }
}

// Merges the candidates of the lanes that differ only in the bits of `lane_bits`.
template <int kLaneBits>
__device__ __forceinline__ void merge_across_lanes(float& best_score, int32_t& best_index) {
#pragma unroll
  for (int offset = 1; offset <= kLaneBits; offset <<= 1) {
    const float other_score = __shfl_xor_sync(0xffffffffu, best_score, offset);
    const int32_t other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
    merge_candidate(other_score, other_index, best_score, best_index);
  }
}

__device__ __forceinline__ void write_partial(const VqSearchArgs& a, int64_t row, float score,
                                              int32_t index) {
  if (row >= a.n) return;
  const int64_t at = static_cast<int64_t>(blockIdx.y) * a.n + row;
  a.part_score[at] = score;
  a.part_index[at] = index;
}

// ---------------------------------------------------------------------------------------------
// Prepare kernel: one thread per (padded) code.
template <typename scalar_t, typename out_t, bool kDimMajor>
__global__ void vq_prepare_codes_kernel(const scalar_t* __restrict__ codebook, int64_t cs0,
                                        int64_t cs1, int64_t K, int64_t D, int64_t k_pad,
                                        int64_t d_pad, VqMetric metric, out_t* __restrict__ out,
                                        float* __restrict__ bias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k_pad) return;
  // kDimMajor: out is [d_pad][k_pad] (neighbouring threads write neighbouring addresses);
  // otherwise [k_pad][d_pad], the row-per-code layout the mma B operand wants.
  const auto store = [&](int64_t d, float v) {
    out[kDimMajor ? d * k_pad + j : j * d_pad + d] = static_cast<out_t>(v);
  };
  if (j >= K) {
    bias[j] = kernels::positive_infinity_f32();
    for (int64_t d = 0; d < d_pad; ++d) store(d, 0.0f);
    return;
  }
  const scalar_t* row = codebook + j * cs0;
  float sum_sq = 0.0f;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {  // index order, as on the CPU
    const float v = static_cast<float>(row[d * cs1]);
    finite = finite && kernels::is_finite_f32(v);
    sum_sq = fmaf(v, v, sum_sq);
  }
  const kernels::VqCodePrep prep = kernels::vq_prepare_code(sum_sq, finite, metric);
  bias[j] = prep.bias;
  // A non-finite code keeps zeros (inf * 0 would be NaN); its +inf bias already excludes it.
  for (int64_t d = 0; d < d_pad; ++d) {
    const float v = (finite && d < D) ? static_cast<float>(row[d * cs1]) * prep.multiplier : 0.0f;
    store(d, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core search kernel (bf16 / fp16 operands, fp32 accumulation).
struct MmaStage {
  uint16_t* x;      // [kTileRows][kMmaLd]
  uint16_t* codes;  // [kTileCodes][kMmaLd]
  float* bias;      // [kTileCodes]
};

__device__ __forceinline__ MmaStage mma_stage(unsigned char* smem, int stage) {
  unsigned char* base = smem + stage * kMmaStageBytes;
  MmaStage s;
  s.x = reinterpret_cast<uint16_t*>(base);
  s.codes = s.x + kTileRows * kMmaLd;
  s.bias = reinterpret_cast<float*>(s.codes + kTileCodes * kMmaLd);
  return s;
}

// Copies step `step` (code tile, D chunk) into `st`: 128 rows x 32 elements of x and of the codes
// as 16-byte segments (rows past n and D past x_ld are zero-filled), and the tile's 128 biases.
__device__ __forceinline__ void mma_load_step(const VqSearchArgs& a, const MmaStage& st,
                                              int64_t row0, int tile, int chunk) {
  const int tid = threadIdx.x;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const uint16_t* codes = static_cast<const uint16_t*>(a.codes);
  const int64_t code0 = static_cast<int64_t>(tile) * kTileCodes;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int seg = tid + i * kThreads;
    const int r = seg >> 2;               // row (of x) and code (of the codebook) in the tile
    const int part = seg & 3;             // which 8 elements of the 32-element chunk
    const int64_t d = static_cast<int64_t>(chunk) * kMmaChunk + part * 8;
    const int64_t grow = row0 + r;
    const bool valid = grow < a.n && d < a.x_ld;  // x_ld % 8 == 0: a segment is all in or all out
    cuda_ptx::cp_async_16(st.x + r * kMmaLd + part * 8, valid ? x + grow * a.x_ld + d : x, valid);
    cuda_ptx::cp_async_16(st.codes + r * kMmaLd + part * 8, codes + (code0 + r) * a.d_pad + d,
                          true);
  }
  if (tid < kTileCodes / 4) cuda_ptx::cp_async_16(st.bias + tid * 4, a.bias + code0 + tid * 4, true);
}

// acc[mi][ni] += x rows (warp_m*64 + mi*16 .. +16) . codes (warp_n*32 + ni*8 .. +8) over the chunk.
template <bool kBf16>
__device__ __forceinline__ void mma_chunk(const MmaStage& st, int warp_m, int warp_n, int lane,
                                          float (&acc)[4][4][4]) {
#pragma unroll
  for (int kk = 0; kk < kMmaChunk; kk += 16) {
    // B fragments, two n8 tiles per ldmatrix.x4: lanes 0-7 / 8-15 address codes 0-7 at k 0 / 8,
    // lanes 16-23 / 24-31 codes 8-15 at k 0 / 8.
    uint32_t b[4][2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int code = warp_n * kMmaWarpCodes + p * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int k = kk + ((lane >> 3) & 1) * 8;
      uint32_t r[4];
      cuda_ptx::ldmatrix_x4(r, st.codes + code * kMmaLd + k);
      b[2 * p][0] = r[0];
      b[2 * p][1] = r[1];
      b[2 * p + 1][0] = r[2];
      b[2 * p + 1][1] = r[3];
    }
    // A fragment of one m16 tile: lanes 0-15 address rows 0-15 at k 0, lanes 16-31 at k 8.
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      const int row = warp_m * kMmaWarpRows + mi * 16 + (lane & 15);
      uint32_t af[4];
      cuda_ptx::ldmatrix_x4(af, st.x + row * kMmaLd + kk + (lane >> 4) * 8);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) cuda_ptx::mma_16x8x16<kBf16>(acc[mi][ni], af, b[ni]);
    }
  }
}

// Epilogue of one code tile. Accumulator acc[mi][ni][2h + e] is row warp_m*64 + mi*16 + group + 8h,
// code warp_n*32 + ni*8 + 2*quad + e; for a fixed row the codes visited here increase.
__device__ __forceinline__ void mma_fold_tile(const float (&acc)[4][4][4], const float* tile_bias,
                                              int tile, int warp_n, int quad, float scale,
                                              float (&best_score)[kMmaRowsPerThread],
                                              int32_t (&best_index)[kMmaRowsPerThread]) {
  const int col0 = warp_n * kMmaWarpCodes + 2 * quad;
  float2 bias[4];
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) bias[ni] = *reinterpret_cast<const float2*>(tile_bias + col0 + ni * 8);
  const int32_t index0 = tile * kTileCodes + col0;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int slot = mi * 2 + h;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float s = kernels::vq_score(e == 0 ? bias[ni].x : bias[ni].y, scale,
                                            acc[mi][ni][2 * h + e]);
          if (s < best_score[slot]) {  // strict: NaN / +inf never win, first tie kept
            best_score[slot] = s;
            best_index[slot] = index0 + ni * 8 + e;
          }
        }
      }
    }
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    vq_search_mma_kernel(const VqSearchArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red_score[kMmaWarpsN][kTileRows];
  __shared__ int32_t red_index[kMmaWarpsN][kTileRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kMmaWarpsN, warp_n = warp % kMmaWarpsN;
  const int group = lane >> 2, quad = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const TileRange range = split_tiles(a);

  float acc[4][4][4];
  float best_score[kMmaRowsPerThread];
  int32_t best_index[kMmaRowsPerThread];
#pragma unroll
  for (int s = 0; s < kMmaRowsPerThread; ++s) {
    best_score[s] = kernels::positive_infinity_f32();
    best_index[s] = -1;
  }

  run_pipeline(
      range.steps,
      [&](int step, int stage) {
        const int t = step / a.num_chunks;
        mma_load_step(a, mma_stage(smem, stage), row0, range.begin + t, step - t * a.num_chunks);
      },
      [&](int step, int stage) {
        const int t = step / a.num_chunks;
        const int chunk = step - t * a.num_chunks;
        if (chunk == 0) {
#pragma unroll
          for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
        }
        const MmaStage st = mma_stage(smem, stage);
        mma_chunk<kBf16>(st, warp_m, warp_n, lane, acc);
        if (chunk == a.num_chunks - 1) {
          mma_fold_tile(acc, st.bias, range.begin + t, warp_n, quad, a.scale, best_score,
                        best_index);
        }
      });

  // The 4 lanes of a quad share rows; then the kMmaWarpsN warps along the codes do.
#pragma unroll
  for (int s = 0; s < kMmaRowsPerThread; ++s) merge_across_lanes<2>(best_score[s], best_index[s]);
  if (quad == 0) {
#pragma unroll
    for (int s = 0; s < kMmaRowsPerThread; ++s) {
      const int r = warp_m * kMmaWarpRows + (s >> 1) * 16 + (s & 1) * 8 + group;
      red_score[warp_n][r] = best_score[s];
      red_index[warp_n][r] = best_index[s];
    }
  }
  __syncthreads();
  if (tid < kTileRows) {
    float score = red_score[0][tid];
    int32_t index = red_index[0][tid];
#pragma unroll
    for (int w = 1; w < kMmaWarpsN; ++w) merge_candidate(red_score[w][tid], red_index[w][tid], score, index);
    write_partial(a, row0 + tid, score, index);
  }
#else
  // Never launched: the host picks the SIMT kernel below sm80 (and this build ships sm80+ only).
  (void)a;
#endif
}

// ---------------------------------------------------------------------------------------------
// SIMT fp32 search kernel.
struct SimtStage {
  float* x;      // [kSimtChunk][kTileRows]  (d-major)
  float* codes;  // [kSimtChunk][kTileCodes] (d-major)
  float* bias;   // [kTileCodes]
};

__device__ __forceinline__ SimtStage simt_stage(unsigned char* smem, int stage) {
  float* base = reinterpret_cast<float*>(smem) + stage * kSimtStageFloats;
  return {base, base + kSimtChunk * kTileRows, base + 2 * kSimtChunk * kTileRows};
}

// Both operands are padded in every direction, so the copies need no predicates.
__device__ __forceinline__ void simt_load_step(const VqSearchArgs& a, const SimtStage& st,
                                               int64_t row0, int tile, int chunk) {
  const int tid = threadIdx.x;
  const float* xt = static_cast<const float*>(a.x);
  const float* codes = static_cast<const float*>(a.codes);
  const int64_t code0 = static_cast<int64_t>(tile) * kTileCodes;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int seg = tid + i * kThreads;
    const int dk = seg >> 5;    // d within the chunk
    const int part = seg & 31;  // which 4 rows / codes of the 128
    const int64_t d = static_cast<int64_t>(chunk) * kSimtChunk + dk;
    cuda_ptx::cp_async_16(st.x + dk * kTileRows + part * 4, xt + d * a.x_ld + row0 + part * 4, true);
    cuda_ptx::cp_async_16(st.codes + dk * kTileCodes + part * 4, codes + d * a.k_pad + code0 + part * 4,
                          true);
  }
  if (tid < kTileCodes / 4) cuda_ptx::cp_async_16(st.bias + tid * 4, a.bias + code0 + tid * 4, true);
}

// Reads 4 + 4 floats at offsets `lo` and 64 + `lo` of a 128-float smem row.
__device__ __forceinline__ void load_split_quad(const float* row, int lo, float (&v)[8]) {
  const float4 p = *reinterpret_cast<const float4*>(row + lo);
  const float4 q = *reinterpret_cast<const float4*>(row + 64 + lo);
  v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w;
  v[4] = q.x; v[5] = q.y; v[6] = q.z; v[7] = q.w;
}

// Thread (ty, tx) micro-tile slot i -> row / code offset within the 128-wide tile.
__device__ __forceinline__ int split_quad_offset(int owner, int i) {
  return (i < 4 ? 0 : 64) + owner * 4 + (i & 3);
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    vq_search_simt_kernel(const VqSearchArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const TileRange range = split_tiles(a);

  float acc[8][8];
  float best_score[8];
  int32_t best_index[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best_score[i] = kernels::positive_infinity_f32();
    best_index[i] = -1;
  }

  run_pipeline(
      range.steps,
      [&](int step, int stage) {
        const int t = step / a.num_chunks;
        simt_load_step(a, simt_stage(smem, stage), row0, range.begin + t, step - t * a.num_chunks);
      },
      [&](int step, int stage) {
        const int t = step / a.num_chunks;
        const int chunk = step - t * a.num_chunks;
        if (chunk == 0) {
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
        }
        const SimtStage st = simt_stage(smem, stage);
        // Ascending d with one fmaf per term: the same order and rounding as the CPU micro-kernel.
#pragma unroll
        for (int k = 0; k < kSimtChunk; ++k) {
          float xv[8], cv[8];
          load_split_quad(st.x + k * kTileRows, ty * 4, xv);
          load_split_quad(st.codes + k * kTileCodes, tx * 4, cv);
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(xv[i], cv[j], acc[i][j]);
        }
        if (chunk == a.num_chunks - 1) {
          float bias[8];
          load_split_quad(st.bias, tx * 4, bias);
          const int32_t index0 = (range.begin + t) * kTileCodes;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {  // j ascending = code index ascending
              const float s = kernels::vq_score(bias[j], a.scale, acc[i][j]);
              if (s < best_score[i]) {
                best_score[i] = s;
                best_index[i] = index0 + split_quad_offset(tx, j);
              }
            }
          }
        }
      });

  // The 16 threads with the same ty (one half-warp) share rows.
#pragma unroll
  for (int i = 0; i < 8; ++i) merge_across_lanes<8>(best_score[i], best_index[i]);
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) write_partial(a, row0 + split_quad_offset(ty, i), best_score[i], best_index[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Finalize kernel: one thread per row.
template <typename scalar_t>
__global__ void vq_finalize_kernel(const scalar_t* __restrict__ x, int64_t xs0, int64_t xs1,
                                   const scalar_t* __restrict__ codebook, int64_t cs0, int64_t cs1,
                                   const float* __restrict__ part_score,
                                   const int32_t* __restrict__ part_index, int splits, int64_t n,
                                   int64_t D, VqMetric metric, int64_t* __restrict__ out_index,
                                   float* __restrict__ out_distance) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float best_score = kernels::positive_infinity_f32();
  int64_t best_index = -1;
  for (int s = 0; s < splits; ++s) {  // splits hold increasing code ranges
    const float score = part_score[s * n + row];
    const int64_t index = part_index[s * n + row];
    if (kernels::vq_better(score, index, best_score, best_index)) {
      best_score = score;
      best_index = index;
    }
  }
  const scalar_t* xr = x + row * xs0;
  const auto load_x = [&](int64_t d) { return static_cast<float>(xr[d * xs1]); };
  if (best_index < 0 || !kernels::vq_row_is_finite(D, load_x)) {
    out_index[row] = -1;
    out_distance[row] = kernels::quiet_nan_f32();
    return;
  }
  const scalar_t* cr = codebook + best_index * cs0;
  const auto load_c = [&](int64_t d) { return static_cast<float>(cr[d * cs1]); };
  out_index[row] = best_index;
  out_distance[row] = kernels::vq_exact_distance(D, load_x, load_c, metric);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Splits the code tiles over blockIdx.y when the row tiles alone would not fill the GPU.
void plan_splits(int64_t row_blocks, VqSearchArgs& args, int& splits) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (kMinBlocksPerSm * sms + row_blocks - 1) / row_blocks;
  const int64_t first = std::clamp<int64_t>(wanted, 1, args.num_tiles);
  args.tiles_per_split = static_cast<int>((args.num_tiles + first - 1) / first);
  splits = (args.num_tiles + args.tiles_per_split - 1) / args.tiles_per_split;  // none empty
}

template <typename scalar_t, typename out_t, bool kDimMajor>
void launch_prepare(const at::Tensor& codebook, VqMetric metric, int64_t k_pad, int64_t d_pad,
                    at::Tensor& prepared, at::Tensor& bias, cudaStream_t stream) {
  constexpr int kPrepThreads = 256;
  const int64_t blocks = (k_pad + kPrepThreads - 1) / kPrepThreads;
  vq_prepare_codes_kernel<scalar_t, out_t, kDimMajor><<<blocks, kPrepThreads, 0, stream>>>(
      codebook.const_data_ptr<scalar_t>(), codebook.stride(0), codebook.stride(1),
      codebook.size(0), codebook.size(1), k_pad, d_pad, metric,
      reinterpret_cast<out_t*>(prepared.data_ptr()), bias.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Partials {
  at::Tensor score;  // float32 [splits][n]
  at::Tensor index;  // int32 [splits][n]
  int splits = 0;
};

// Allocates the partial outputs, fills in the grid-related args and returns the grid.
dim3 plan_search(int64_t n, const at::Tensor& like, VqSearchArgs& args, Partials& partials) {
  const int64_t row_blocks = (n + kTileRows - 1) / kTileRows;
  plan_splits(row_blocks, args, partials.splits);
  partials.score = at::empty({partials.splits, n}, like.options().dtype(at::kFloat));
  partials.index = at::empty({partials.splits, n}, like.options().dtype(at::kInt));
  args.part_score = partials.score.data_ptr<float>();
  args.part_index = partials.index.data_ptr<int32_t>();
  args.n = n;
  return dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(partials.splits));
}

// x as [n][x_ld] rows the mma loader can copy in aligned 16-byte pieces: x2 itself when it
// already is, otherwise a zero-padded contiguous copy (O(N*D)).
at::Tensor mma_row_operand(const at::Tensor& x2) {
  const int64_t D = x2.size(1);
  const bool usable = x2.is_contiguous() && D % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 == 0;
  if (usable) return x2;
  at::Tensor padded = at::zeros({x2.size(0), round_up(D, 8)}, x2.options());
  padded.narrow(1, 0, D).copy_(x2);
  return padded;
}

template <typename scalar_t>
Partials search_tensor_cores(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                             cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const int64_t n = x2.size(0), D = x2.size(1), K = codebook.size(0);
  VqSearchArgs args{};
  args.d_pad = round_up(D, kMmaChunk);
  args.k_pad = round_up(K, kTileCodes);
  args.num_chunks = static_cast<int>(args.d_pad / kMmaChunk);
  args.num_tiles = static_cast<int>(args.k_pad / kTileCodes);
  args.scale = kernels::vq_score_scale(metric);

  at::Tensor prepared = at::empty({args.k_pad, args.d_pad}, codebook.options());
  at::Tensor bias = at::empty({args.k_pad}, codebook.options().dtype(at::kFloat));
  launch_prepare<scalar_t, scalar_t, false>(codebook, metric, args.k_pad, args.d_pad, prepared,
                                            bias, stream);
  const at::Tensor rows = mma_row_operand(x2);
  args.x = rows.const_data_ptr();
  args.x_ld = rows.size(1);
  args.codes = prepared.const_data_ptr();
  args.bias = bias.const_data_ptr<float>();

  Partials partials;
  const dim3 grid = plan_search(n, x2, args, partials);
  const auto kernel = vq_search_mma_kernel<kBf16>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      kMmaSmemBytes));
  kernel<<<grid, kThreads, kMmaSmemBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// fp32 SIMT search; bf16/fp16 come here only on pre-sm80 GPUs, converted to fp32 copies.
template <typename scalar_t>
Partials search_simt(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                     cudaStream_t stream) {
  const int64_t n = x2.size(0), D = x2.size(1), K = codebook.size(0);
  VqSearchArgs args{};
  args.d_pad = round_up(D, kSimtChunk);
  args.k_pad = round_up(K, kTileCodes);
  args.num_chunks = static_cast<int>(args.d_pad / kSimtChunk);
  args.num_tiles = static_cast<int>(args.k_pad / kTileCodes);
  args.scale = kernels::vq_score_scale(metric);

  const at::TensorOptions f32 = codebook.options().dtype(at::kFloat);
  at::Tensor prepared = at::empty({args.d_pad, args.k_pad}, f32);
  at::Tensor bias = at::empty({args.k_pad}, f32);
  launch_prepare<scalar_t, float, true>(codebook, metric, args.k_pad, args.d_pad, prepared, bias,
                                        stream);
  // x^T, zero-padded to [d_pad][n rounded up to a row tile]: O(N*D), cheap next to the search.
  const int64_t n_pad = round_up(n, kTileRows);
  at::Tensor xt = at::zeros({args.d_pad, n_pad}, f32);
  xt.narrow(0, 0, D).narrow(1, 0, n).copy_(x2.t());
  args.x = xt.const_data_ptr();
  args.x_ld = n_pad;
  args.codes = prepared.const_data_ptr();
  args.bias = bias.const_data_ptr<float>();

  Partials partials;
  const dim3 grid = plan_search(n, x2, args, partials);
  C10_CUDA_CHECK(cudaFuncSetAttribute(vq_search_simt_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kSimtSmemBytes));
  vq_search_simt_kernel<<<grid, kThreads, kSimtSmemBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

template <typename scalar_t>
void vq_lookup_cuda_typed(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                          at::Tensor& indices, at::Tensor& distance) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr bool kHalfWidth = !std::is_same_v<scalar_t, float>;
  const bool tensor_cores = kHalfWidth && at::cuda::getCurrentDeviceProperties()->major >= 8;
  const Partials partials = tensor_cores
                                ? search_tensor_cores<scalar_t>(x2, codebook, metric, stream)
                                : search_simt<scalar_t>(x2, codebook, metric, stream);
  const int64_t n = x2.size(0);
  constexpr int kFinalizeThreads = 256;
  const int64_t blocks = (n + kFinalizeThreads - 1) / kFinalizeThreads;
  vq_finalize_kernel<scalar_t><<<blocks, kFinalizeThreads, 0, stream>>>(
      x2.const_data_ptr<scalar_t>(), x2.stride(0), x2.stride(1),
      codebook.const_data_ptr<scalar_t>(), codebook.stride(0), codebook.stride(1),
      partials.score.const_data_ptr<float>(), partials.index.const_data_ptr<int32_t>(),
      partials.splits, n, x2.size(1), metric, indices.data_ptr<int64_t>(),
      distance.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> vq_lookup_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                  c10::string_view metric_name) {
  check_vq_inputs(x, codebook);
  const VqMetric metric = parse_vq_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK_VALUE(x.is_cuda(), "vq_lookup (CUDA): x must be a CUDA tensor, got ", x.device());
  // Code indices, padding included, are int32 inside the kernels.
  TORCH_CHECK_VALUE(codebook.size(0) <= INT32_MAX - kTileCodes,
                    "vq_lookup (CUDA): at most 2^31 - 129 codes are supported, got ",
                    codebook.size(0));
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t D = codebook.size(1);
  const auto out_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor indices = at::empty(out_shape, x.options().dtype(at::kLong));
  at::Tensor distance = at::empty(out_shape, x.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, distance};
  const at::Tensor x2 = x.reshape({-1, D});

  switch (x.scalar_type()) {
    case at::kFloat:
      vq_lookup_cuda_typed<float>(x2, codebook, metric, indices, distance);
      break;
    case at::kBFloat16:
      vq_lookup_cuda_typed<c10::BFloat16>(x2, codebook, metric, indices, distance);
      break;
    case at::kHalf:
      vq_lookup_cuda_typed<c10::Half>(x2, codebook, metric, indices, distance);
      break;
    default:  // check_vq_inputs already rejected every other dtype
      TORCH_CHECK_TYPE(false, "vq_lookup (CUDA): unsupported dtype ", x.scalar_type());
  }
  return {indices, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) { m.impl("vq_lookup", &vq_lookup_cuda); }

}  // namespace fourm_fast
