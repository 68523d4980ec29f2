// The vq_lookup CUDA kernels (device code only; the design is described at the top of
// vq_cuda.cu, which includes this file and launches them). Kept apart from the host code so
// tests/cuda_emulation/ can compile these exact kernels as host C++ and run them without a GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../kernels/vq_math.h"
#include "ptx.cuh"

namespace fourm_fast {
namespace {  // included by one translation unit of the extension (vq_cuda.cu)

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
    const float v = (finite && d < D) ? kernels::vq_prepared_entry(static_cast<float>(row[d * cs1]), prep) : 0.0f;
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
#if FF_CUDA_SM80
  FF_DYNAMIC_SMEM(smem);
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
  FF_DYNAMIC_SMEM(smem);
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

}  // namespace
}  // namespace fourm_fast
