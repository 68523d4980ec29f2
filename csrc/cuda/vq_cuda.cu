// CUDA executor of vq_lookup: a tiled GEMM x * C'^T whose epilogue turns each dot product into a
// score (csrc/kernels/vq_math.h) and folds it into a running per-row argmin held in registers, so
// the N x K distance matrix never exists. Semantics match csrc/cpu/vq_cpu.cpp.
//
// Three kernels, all on the current stream:
//  1. prepare: one thread per code (K rounded up to a tile) computes |c|^2 and the finite flag in
//     index order (the CPU's order, so the biases agree bit for bit), then writes the prepared code
//     c' = c * multiplier and bias[K_pad]; padding codes and padding dims are zero, padding codes
//     get bias +inf. c' is stored tile-major: one contiguous block per (code tile, D chunk), in the
//     order the search streams it, so each pipeline step copies one contiguous run.
//  2. search, grid (row tiles of 128, code splits), 256 threads, a 3-stage cp.async pipeline over
//     the (code tile, D chunk) steps of the block's code range:
//     - tensor cores (bf16/fp16, sm80+): tiles of 128 rows x 128 codes, D in chunks of 32. 8 warps
//       as 2 (rows) x 4 (codes); a warp owns 64 rows x 32 codes = 4 x 4 mma.m16n8k16 tiles with
//       fp32 accumulators, fed by ldmatrix from smem rows whose pitch is 16 bytes past a multiple
//       of 64 (the 8 row addresses of an ldmatrix phase hit 8 distinct 16-byte bank groups). The
//       x tile stays resident in smem for the whole code loop when two blocks still fit per SM
//       (D <= 288 on H100, D <= 160 on A100), which halves the L2 traffic; otherwise x is streamed
//       with the codes. The epilogue reads the accumulators straight from registers (the mma
//       fragment layout is fixed by PTX): each thread owns 8 rows x 8 codes of a tile.
//       Smem: codes 3 x 10,752 B + x (resident 256 * (D_pad + 8) B, streamed 3 x 10,240 B) + 4 KiB.
//     - SIMT fp32 (also the pre-sm80 fallback for bf16/fp16, on fp32 copies): tiles of 128 x 128,
//       D in chunks of 16; threads as 16 x 16, each an 8 x 8 micro-tile (rows ty*4+i and
//       64+ty*4+i, codes tx*4+j and 64+tx*4+j) read as float4 from smem. x is staged transposed
//       and zero-padded (x^T [D_pad][N_pad]) so every copy is an aligned, unpredicated 16-byte
//       cp.async. Smem: 3 x 16,896 B.
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
// Tiling constants.
constexpr int kThreads = 256;
constexpr int kTileRows = 128;   // rows of x per block
constexpr int kTileCodes = 128;  // codes per tile; a block loops over all tiles of its split
constexpr int kStages = 3;       // cp.async pipeline depth
constexpr int kMinBlocksPerSm = 2;

// Tensor-core kernel.
constexpr int kMmaChunk = 32;          // D elements per pipeline step
constexpr int kMmaLd = kMmaChunk + 8;  // pitch (elements) of streamed smem rows: 80 bytes
constexpr int kMmaWarpsN = 4;          // warps along the codes of a tile (2 along the rows)
constexpr int kMmaWarpRows = 64;       // rows per warp: 4 m16 tiles
constexpr int kMmaWarpCodes = 32;      // codes per warp: 4 n8 tiles
constexpr int kMmaRowsPerThread = 8;   // 4 m16 tiles x {group, group + 8}
constexpr int kMmaTileBytes = kTileRows * kMmaLd * 2;          // one streamed 128 x 32 tile
constexpr int kMmaCodeStageBytes = kMmaTileBytes + kTileCodes * 4;  // codes + their biases
constexpr int kMmaStaticSmemBytes = kMmaWarpsN * kTileRows * 8;     // red_score + red_index

// SIMT kernel.
constexpr int kSimtChunk = 16;
constexpr int kSimtStageFloats = 2 * kSimtChunk * kTileRows + kTileCodes;
constexpr int kSimtSmemBytes = kStages * kSimtStageFloats * 4;

static_assert(kTileRows * kMmaChunk / 8 == 2 * kThreads, "mma copies: 2 segments per thread");
static_assert(kSimtChunk * kTileRows / 4 == 2 * kThreads, "simt copies: 2 segments per thread");
static_assert(kTileRows == kTileCodes, "the simt copies share one segment mapping");
static_assert(kMmaTileBytes % 16 == 0 && kMmaCodeStageBytes % 16 == 0, "16-byte aligned stages");
static_assert((kSimtStageFloats * 4) % 16 == 0, "16-byte aligned stages");
static_assert(kThreads / 32 == 2 * kMmaWarpsN, "mma warp grid is 2 x kMmaWarpsN");

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Arguments of a search kernel. Layouts differ per kernel (see the top comment).
struct VqSearchArgs {
  const void* x;       // mma: rows [n][x_ld] in the input dtype; simt: x^T [d_pad][x_ld] fp32
  const void* codes;   // tile-major prepared codebook (see tiled_code_offset)
  const float* bias;   // [k_pad], +inf for padding and non-finite codes
  float* part_score;   // [splits][n]: best score of the split for each row
  int32_t* part_index; // [splits][n]: its code index, -1 when nothing was selected
  int64_t n;
  int64_t x_ld;        // mma: elements per row of x (multiple of 8, >= D); simt: padded N
  int64_t d_pad;       // D rounded up to the kernel's chunk
  int num_chunks;      // d_pad / chunk
  int num_tiles;       // k_pad / kTileCodes
  int tiles_per_split;
  float scale;         // vq_score_scale(metric)
};

// Offset of element (code j, dim d) in the tile-major prepared codebook: blocks of kTileCodes codes
// x kChunk dims ordered (tile, chunk), so pipeline step s of a tile range reads block
// tile * num_chunks + chunk, one contiguous run. Inside a block: code-major ([code][dim], the mma
// B operand) or dim-major ([dim][code], the SIMT float4 reads).
template <int kChunk, bool kDimMajor>
__device__ __forceinline__ int64_t tiled_code_offset(int64_t j, int64_t d, int64_t num_chunks) {
  const int64_t block = (j / kTileCodes) * num_chunks + d / kChunk;
  const int64_t r = j % kTileCodes, dd = d % kChunk;
  return block * (kTileCodes * kChunk) + (kDimMajor ? dd * kTileCodes + r : r * kChunk + dd);
}

// Position of one pipeline step: code tile, D chunk, block of the tile-major codebook, and the
// stage buffer that holds it. Advanced step by step (no divisions in the loop).
struct StepCursor {
  int tile;
  int chunk;
  int stage;
  int64_t block;

  __device__ __forceinline__ void advance(int num_chunks) {
    ++block;
    if (++chunk == num_chunks) {
      chunk = 0;
      ++tile;
    }
    if (++stage == kStages) stage = 0;
  }
};

// Multi-stage cp.async pipeline over the steps of this block's code tiles (blockIdx.y picks the
// split). load(cursor) issues the copies of one step; consume(cursor) reads them. Group g holds the
// copies of step g (the x copies a caller issues before this call join group 0), so waiting until
// kStages - 2 groups are pending means step `it` has landed; the barrier then also guarantees that
// every thread is done with the stage of step it - 1, which this iteration's load overwrites.
template <class Load, class Consume>
__device__ __forceinline__ void run_pipeline(const VqSearchArgs& a, Load&& load,
                                             Consume&& consume) {
  const int first_tile = static_cast<int>(blockIdx.y) * a.tiles_per_split;
  const int last_tile = min(a.num_tiles, first_tile + a.tiles_per_split);
  const int steps = max(last_tile - first_tile, 0) * a.num_chunks;
  const StepCursor start{first_tile, 0, 0, static_cast<int64_t>(first_tile) * a.num_chunks};

  StepCursor next_load = start;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      load(next_load);
      next_load.advance(a.num_chunks);
    }
    cuda_ptx::cp_async_commit();
  }
  StepCursor current = start;
  for (int it = 0; it < steps; ++it) {
    cuda_ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < steps) {
      load(next_load);
      next_load.advance(a.num_chunks);
    }
    cuda_ptx::cp_async_commit();  // possibly empty: keeps the group count in step with `it`
    consume(current);
    current.advance(a.num_chunks);
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

// Merges the candidates of lanes whose ids differ only below bit log2(kMaxOffset) + 1.
template <int kMaxOffset>
__device__ __forceinline__ void merge_across_lanes(float& best_score, int32_t& best_index) {
#pragma unroll
  for (int offset = 1; offset <= kMaxOffset; offset <<= 1) {
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

// Copies the biases of `tile` (kTileCodes floats) into smem; warp 0 issues them.
__device__ __forceinline__ void copy_tile_bias(const VqSearchArgs& a, int tile, float* dst) {
  const int tid = threadIdx.x;
  if (tid < kTileCodes / 4) {
    cuda_ptx::cp_async_16(dst + tid * 4, a.bias + static_cast<int64_t>(tile) * kTileCodes + tid * 4,
                          true);
  }
}

// ---------------------------------------------------------------------------------------------
// Prepare kernel: one thread per (padded) code.
template <typename scalar_t, typename out_t, int kChunk, bool kDimMajor>
__global__ void vq_prepare_codes_kernel(const scalar_t* __restrict__ codebook, int64_t cs0,
                                        int64_t cs1, int64_t K, int64_t D, int64_t k_pad,
                                        int64_t d_pad, VqMetric metric, out_t* __restrict__ out,
                                        float* __restrict__ bias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k_pad) return;
  const int64_t num_chunks = d_pad / kChunk;
  const auto store = [&](int64_t d, float v) {
    out[tiled_code_offset<kChunk, kDimMajor>(j, d, num_chunks)] = static_cast<out_t>(v);
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
    // Rounded to the input dtype whatever out_t is (the CPU executor does the same).
    store(d, static_cast<float>(static_cast<scalar_t>(v)));
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core search kernel (bf16 / fp16 operands, fp32 accumulation).
//
// Dynamic smem: [x region][kStages x (codes tile, tile biases)]. The x region is the whole
// 128 x d_pad row tile (pitch d_pad + 8) when resident, else kStages streamed 128 x 32 tiles.
template <bool kResidentX>
struct MmaSmem {
  unsigned char* base;
  int64_t d_pad;

  __device__ __forceinline__ int x_region_bytes() const {
    return kResidentX ? static_cast<int>(kTileRows * (d_pad + 8) * 2) : kStages * kMmaTileBytes;
  }
  __device__ __forceinline__ int x_pitch() const {
    return kResidentX ? static_cast<int>(d_pad + 8) : kMmaLd;
  }
  // Start of the x columns of `cursor`'s chunk.
  __device__ __forceinline__ uint16_t* x(const StepCursor& cursor) const {
    uint16_t* region = reinterpret_cast<uint16_t*>(base);
    return kResidentX ? region + cursor.chunk * kMmaChunk
                      : region + cursor.stage * (kMmaTileBytes / 2);
  }
  __device__ __forceinline__ uint16_t* codes(int stage) const {
    return reinterpret_cast<uint16_t*>(base + x_region_bytes() + stage * kMmaCodeStageBytes);
  }
  __device__ __forceinline__ float* bias(int stage) const {
    return reinterpret_cast<float*>(codes(stage) + kTileRows * kMmaLd);
  }
};

// Copies chunk `chunk` of the block's 128 rows of x (32 elements a row, as 4 x 16 bytes) to
// dst[r * pitch + 8 * part]. Rows past n and dims past x_ld are zero-filled; x_ld is a multiple of
// 8, so a 16-byte segment is entirely inside or entirely outside the row.
__device__ __forceinline__ void mma_copy_x_chunk(const VqSearchArgs& a, int64_t row0, int chunk,
                                                 uint16_t* dst, int pitch) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int seg = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = seg >> 2, part = seg & 3;
    const int64_t d = static_cast<int64_t>(chunk) * kMmaChunk + part * 8;
    const int64_t row = row0 + r;
    const bool valid = row < a.n && d < a.x_ld;
    cuda_ptx::cp_async_16(dst + r * pitch + part * 8, valid ? x + row * a.x_ld + d : x, valid);
  }
}

// Copies codebook block `block` (128 codes x 32 dims, contiguous) into a [128][kMmaLd] tile.
__device__ __forceinline__ void mma_copy_codes(const VqSearchArgs& a, int64_t block,
                                               uint16_t* dst) {
  const uint16_t* src = static_cast<const uint16_t*>(a.codes) + block * (kTileCodes * kMmaChunk);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int seg = static_cast<int>(threadIdx.x) + i * kThreads;
    cuda_ptx::cp_async_16(dst + (seg >> 2) * kMmaLd + (seg & 3) * 8, src + seg * 8, true);
  }
}

// acc[mi][ni] += x rows (warp_m*64 + mi*16 .. +16) . codes (warp_n*32 + ni*8 .. +8) over one chunk.
// xs points at the chunk's first column of row 0 (row pitch x_pitch), cs at a [128][kMmaLd] tile.
template <bool kBf16>
__device__ __forceinline__ void mma_chunk(const uint16_t* xs, int x_pitch, const uint16_t* cs,
                                          int warp_m, int warp_n, int lane, float (&acc)[4][4][4]) {
#pragma unroll
  for (int kk = 0; kk < kMmaChunk; kk += 16) {
    // B fragments, two n8 tiles per ldmatrix.x4: lanes 0-7 / 8-15 address codes 0-7 at k 0 / 8,
    // lanes 16-23 / 24-31 codes 8-15 at k 0 / 8.
    uint32_t b[4][2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int code = warp_n * kMmaWarpCodes + p * 16 + (lane & 7) + ((lane >> 4) << 3);
      uint32_t r[4];
      cuda_ptx::ldmatrix_x4(r, cs + code * kMmaLd + kk + ((lane >> 3) & 1) * 8);
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
      cuda_ptx::ldmatrix_x4(af, xs + row * x_pitch + kk + (lane >> 4) * 8);
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
  for (int ni = 0; ni < 4; ++ni) {
    bias[ni] = *reinterpret_cast<const float2*>(tile_bias + col0 + ni * 8);
  }
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
          if (s < best_score[slot]) {  // strict: NaN / +inf never win, the first tie is kept
            best_score[slot] = s;
            best_index[slot] = index0 + ni * 8 + e;
          }
        }
      }
    }
  }
}

template <bool kBf16, bool kResidentX>
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
  const MmaSmem<kResidentX> sm{smem, a.d_pad};

  float acc[4][4][4];
  float best_score[kMmaRowsPerThread];
  int32_t best_index[kMmaRowsPerThread];
#pragma unroll
  for (int s = 0; s < kMmaRowsPerThread; ++s) {
    best_score[s] = kernels::positive_infinity_f32();
    best_index[s] = -1;
  }

  if constexpr (kResidentX) {
    // The whole row tile, once; these copies join the pipeline's first group.
    for (int chunk = 0; chunk < a.num_chunks; ++chunk) {
      mma_copy_x_chunk(a, row0, chunk, reinterpret_cast<uint16_t*>(smem) + chunk * kMmaChunk,
                       sm.x_pitch());
    }
  }

  run_pipeline(
      a,
      [&](const StepCursor& c) {
        if constexpr (!kResidentX) mma_copy_x_chunk(a, row0, c.chunk, sm.x(c), kMmaLd);
        mma_copy_codes(a, c.block, sm.codes(c.stage));
        if (c.chunk == a.num_chunks - 1) copy_tile_bias(a, c.tile, sm.bias(c.stage));
      },
      [&](const StepCursor& c) {
        if (c.chunk == 0) {
#pragma unroll
          for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
        }
        mma_chunk<kBf16>(sm.x(c), sm.x_pitch(), sm.codes(c.stage), warp_m, warp_n, lane, acc);
        if (c.chunk == a.num_chunks - 1) {
          mma_fold_tile(acc, sm.bias(c.stage), c.tile, warp_n, quad, a.scale, best_score,
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
    for (int w = 1; w < kMmaWarpsN; ++w) {
      merge_candidate(red_score[w][tid], red_index[w][tid], score, index);
    }
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
  float* x;      // [kSimtChunk][kTileRows]  (dim-major)
  float* codes;  // [kSimtChunk][kTileCodes] (dim-major)
  float* bias;   // [kTileCodes]
};

__device__ __forceinline__ SimtStage simt_stage(unsigned char* smem, int stage) {
  float* base = reinterpret_cast<float*>(smem) + stage * kSimtStageFloats;
  return {base, base + kSimtChunk * kTileRows, base + 2 * kSimtChunk * kTileRows};
}

// Both operands are padded in every direction, so the copies need no predicates. A segment is 4
// consecutive rows (x^T) or codes of one dim; segment s lands at offset 4 * s of the stage tile.
__device__ __forceinline__ void simt_copy_step(const VqSearchArgs& a, const SimtStage& st,
                                               int64_t row0, const StepCursor& c) {
  const float* xt = static_cast<const float*>(a.x);
  const float* codes = static_cast<const float*>(a.codes) + c.block * (kTileCodes * kSimtChunk);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int seg = static_cast<int>(threadIdx.x) + i * kThreads;
    const int64_t d = static_cast<int64_t>(c.chunk) * kSimtChunk + (seg >> 5);
    cuda_ptx::cp_async_16(st.x + seg * 4, xt + d * a.x_ld + row0 + (seg & 31) * 4, true);
    cuda_ptx::cp_async_16(st.codes + seg * 4, codes + seg * 4, true);
  }
}

// Reads 4 + 4 floats at offsets `lo` and 64 + `lo` of a 128-float smem row.
__device__ __forceinline__ void load_split_quad(const float* row, int lo, float (&v)[8]) {
  const float4 p = *reinterpret_cast<const float4*>(row + lo);
  const float4 q = *reinterpret_cast<const float4*>(row + 64 + lo);
  v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w;
  v[4] = q.x; v[5] = q.y; v[6] = q.z; v[7] = q.w;
}

// Micro-tile slot i of thread coordinate `owner` (ty for rows, tx for codes) -> offset in the tile.
__device__ __forceinline__ int split_quad_offset(int owner, int i) {
  return (i < 4 ? 0 : 64) + owner * 4 + (i & 3);
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    vq_search_simt_kernel(const VqSearchArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;

  float acc[8][8];
  float best_score[8];
  int32_t best_index[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best_score[i] = kernels::positive_infinity_f32();
    best_index[i] = -1;
  }

  run_pipeline(
      a,
      [&](const StepCursor& c) {
        const SimtStage st = simt_stage(smem, c.stage);
        simt_copy_step(a, st, row0, c);
        if (c.chunk == a.num_chunks - 1) copy_tile_bias(a, c.tile, st.bias);
      },
      [&](const StepCursor& c) {
        if (c.chunk == 0) {
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
        }
        const SimtStage st = simt_stage(smem, c.stage);
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
        if (c.chunk == a.num_chunks - 1) {
          float bias[8];
          load_split_quad(st.bias, tx * 4, bias);
          const int32_t index0 = c.tile * kTileCodes;
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
    for (int i = 0; i < 8; ++i) {
      write_partial(a, row0 + split_quad_offset(ty, i), best_score[i], best_index[i]);
    }
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
  kernels::vq_finalize_row(x + row * xs0, xs1, codebook, cs0, cs1, D, best_index, metric, out_index + row,
                           out_distance + row);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Shapes of one search: paddings, chunk counts and the code split. The caller sets the pointers.
VqSearchArgs plan_search(int64_t n, int64_t D, int64_t K, int chunk, VqMetric metric) {
  VqSearchArgs args{};
  args.n = n;
  args.d_pad = round_up(D, chunk);
  args.num_chunks = static_cast<int>(args.d_pad / chunk);
  args.num_tiles = static_cast<int>(round_up(K, kTileCodes) / kTileCodes);
  args.scale = kernels::vq_score_scale(metric);
  // Split the code tiles over blockIdx.y when the row tiles alone would not fill the GPU.
  const int64_t row_blocks = (n + kTileRows - 1) / kTileRows;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (kMinBlocksPerSm * sms + row_blocks - 1) / row_blocks;
  const int64_t splits = std::clamp<int64_t>(wanted, 1, args.num_tiles);
  args.tiles_per_split = static_cast<int>((args.num_tiles + splits - 1) / splits);
  return args;
}

int num_splits(const VqSearchArgs& args) {
  return (args.num_tiles + args.tiles_per_split - 1) / args.tiles_per_split;  // none empty
}

struct Partials {
  at::Tensor score;  // float32 [splits][n]
  at::Tensor index;  // int32 [splits][n]
  int splits = 0;
};

// Allocates the per-split candidates, points args at them and returns the grid.
dim3 attach_partials(const at::Tensor& like, VqSearchArgs& args, Partials& partials) {
  partials.splits = num_splits(args);
  partials.score = at::empty({partials.splits, args.n}, like.options().dtype(at::kFloat));
  partials.index = at::empty({partials.splits, args.n}, like.options().dtype(at::kInt));
  args.part_score = partials.score.data_ptr<float>();
  args.part_index = partials.index.data_ptr<int32_t>();
  const int64_t row_blocks = (args.n + kTileRows - 1) / kTileRows;
  return dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(partials.splits));
}

// Prepared codebook (tile-major, see tiled_code_offset) and biases.
template <typename scalar_t, typename out_t, int kChunk, bool kDimMajor>
void prepare_codes(const at::Tensor& codebook, VqMetric metric, const VqSearchArgs& args,
                   at::Tensor& prepared, at::Tensor& bias, cudaStream_t stream) {
  const int64_t k_pad = static_cast<int64_t>(args.num_tiles) * kTileCodes;
  prepared = at::empty({k_pad * args.d_pad},
                       codebook.options().dtype(c10::CppTypeToScalarType<out_t>::value));
  bias = at::empty({k_pad}, codebook.options().dtype(at::kFloat));
  constexpr int kPrepThreads = 256;
  const int64_t blocks = (k_pad + kPrepThreads - 1) / kPrepThreads;
  vq_prepare_codes_kernel<scalar_t, out_t, kChunk, kDimMajor><<<blocks, kPrepThreads, 0, stream>>>(
      codebook.const_data_ptr<scalar_t>(), codebook.stride(0), codebook.stride(1),
      codebook.size(0), codebook.size(1), k_pad, args.d_pad, metric,
      prepared.data_ptr<out_t>(), bias.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x as [n][x_ld] rows the mma copies can read in aligned 16-byte pieces: x2 itself when it
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

template <bool kBf16, bool kResidentX>
void launch_mma_search(const VqSearchArgs& args, dim3 grid, int smem_bytes, cudaStream_t stream) {
  const auto kernel = vq_search_mma_kernel<kBf16, kResidentX>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
Partials search_tensor_cores(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                             cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  VqSearchArgs args = plan_search(x2.size(0), x2.size(1), codebook.size(0), kMmaChunk, metric);
  at::Tensor prepared, bias;
  prepare_codes<scalar_t, scalar_t, kMmaChunk, false>(codebook, metric, args, prepared, bias,
                                                      stream);
  const at::Tensor rows = mma_row_operand(x2);
  args.x = rows.const_data_ptr();
  args.x_ld = rows.size(1);
  args.codes = prepared.const_data_ptr();
  args.bias = bias.const_data_ptr<float>();
  Partials partials;
  const dim3 grid = attach_partials(x2, args, partials);

  // Keep the x tile resident when two blocks still fit per SM (1 KiB: the per-block reserve).
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident_bytes = kTileRows * (args.d_pad + 8) * 2 + kStages * kMmaCodeStageBytes;
  const int64_t resident_per_sm = kMinBlocksPerSm * (resident_bytes + kMmaStaticSmemBytes + 1024);
  const bool resident = resident_per_sm <= static_cast<int64_t>(prop->sharedMemPerMultiprocessor) &&
                        resident_bytes + kMmaStaticSmemBytes <=
                            static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  if (resident) {
    launch_mma_search<kBf16, true>(args, grid, static_cast<int>(resident_bytes), stream);
  } else {
    launch_mma_search<kBf16, false>(args, grid, kStages * (kMmaTileBytes + kMmaCodeStageBytes),
                                    stream);
  }
  return partials;
}

// fp32 SIMT search; bf16/fp16 come here only on pre-sm80 GPUs, converted to fp32 copies.
template <typename scalar_t>
Partials search_simt(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                     cudaStream_t stream) {
  const int64_t n = x2.size(0), D = x2.size(1);
  VqSearchArgs args = plan_search(n, D, codebook.size(0), kSimtChunk, metric);
  at::Tensor prepared, bias;
  prepare_codes<scalar_t, float, kSimtChunk, true>(codebook, metric, args, prepared, bias, stream);
  // x^T, zero-padded to [d_pad][n rounded up to a row tile]: O(N*D), cheap next to the search.
  const int64_t n_pad = round_up(n, kTileRows);
  at::Tensor xt = at::zeros({args.d_pad, n_pad}, x2.options().dtype(at::kFloat));
  xt.narrow(0, 0, D).narrow(1, 0, n).copy_(x2.t());
  args.x = xt.const_data_ptr();
  args.x_ld = n_pad;
  args.codes = prepared.const_data_ptr();
  args.bias = bias.const_data_ptr<float>();
  Partials partials;
  const dim3 grid = attach_partials(x2, args, partials);
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
  Partials partials;
  if constexpr (std::is_same_v<scalar_t, float>) {
    partials = search_simt<float>(x2, codebook, metric, stream);
  } else if (at::cuda::getCurrentDeviceProperties()->major >= 8) {
    partials = search_tensor_cores<scalar_t>(x2, codebook, metric, stream);
  } else {
    partials = search_simt<scalar_t>(x2, codebook, metric, stream);
  }
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
  auto [indices, distance] = vq_empty_outputs(x);
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
