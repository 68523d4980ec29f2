// The CPU masked_attention executor's units of work, shared by its float32 tiles
// (attention_cpu.cpp) and its bfloat16 AMX tiles (attention_cpu_amx_tiles.cpp): per batch row,
// query blocks of one segment with the exact key range each may see, cut from per-token metadata;
// the scheduler that hands units to threads; the backward's chunks; a block's score tile as the
// row passes take it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <utility>
#include <vector>

#include "../attention_checks.h"
#include "../kernels/attention_math.h"
#include "attention_cpu_rows_dispatch.h"
#include "parallel.h"

namespace fourm_fast {
namespace attn_cpu {

using kernels::AttnKeyMeta;
using kernels::AttnQueryMeta;

constexpr int64_t kTileQ = 128;  // most query rows in one block

// Score elements one extra block costs in fixed overhead (three BLAS calls forward, five
// backward, the row loops); two neighbouring blocks merge when that saves more than it wastes.
constexpr int64_t kBlockOverhead = 512;

// One query block: queries [i0, i1) of a batch row and the key range [jlo, jhi) holding every
// key that any of them may see (jlo == jhi: none).
struct QueryBlock {
  int64_t i0, i1, jlo, jhi;
  int64_t rows() const { return i1 - i0; }
  int64_t area() const { return rows() * (jhi - jlo); }
};

// Metadata of the whole batch as contiguous CPU arrays, and each batch row's query blocks.
struct MetaView {
  const bool* valid = nullptr;
  const int32_t* qseg = nullptr;
  const int32_t* kseg = nullptr;
  const int32_t* qlim = nullptr;
  const int32_t* krank = nullptr;
  bool has_segments = false, has_ranks = false;
  int64_t Nq = 0, Nk = 0;
  std::vector<std::vector<QueryBlock>> blocks;  // [B]
  std::vector<int32_t> valid_lanes;              // [B * Nk]: k_valid as all-ones / zero lanes
  std::vector<at::Tensor> keep_alive;

  AttnQueryMeta query(int64_t b, int64_t i) const {
    return {has_segments ? qseg[b * Nq + i] : 0, has_ranks ? qlim[b * Nq + i] : 0};
  }
  AttnKeyMeta key(int64_t b, int64_t j) const {
    return {valid[b * Nk + j], has_segments ? kseg[b * Nk + j] : 0, has_ranks ? krank[b * Nk + j] : 0};
  }
  bool visible(int64_t b, int64_t i, int64_t j) const {
    return kernels::attn_visible(query(b, i), key(b, j), has_segments, has_ranks);
  }

  // Queries [i0, i1) of one segment (or of any, without segments) see key j iff j is visible to
  // the query with the largest limit, so the exact key range is the first and last such key.
  QueryBlock run_block(int64_t b, int64_t i0, int64_t i1) const {
    AttnQueryMeta widest = query(b, i0);
    for (int64_t i = i0 + 1; i < i1; ++i) widest.limit = std::max(widest.limit, query(b, i).limit);
    auto sees = [&](int64_t j) { return kernels::attn_visible(widest, key(b, j), has_segments, has_ranks); };
    int64_t jlo = 0, jhi = Nk;  // scanned from both ends: short when segments interleave
    while (jlo < Nk && !sees(jlo)) ++jlo;
    if (jlo == Nk) return {i0, i1, 0, 0};
    while (!sees(jhi - 1)) --jhi;
    return {i0, i1, jlo, jhi};
  }

  // A batch row's queries cut into runs of one segment (at most kTileQ rows), each with its exact
  // key range; neighbouring runs merge while the merged block wastes less than a block's
  // overhead. In 4M's decoder a modality's tokens are contiguous, so a block meets one modality's
  // keys and the masked area is never computed.
  std::vector<QueryBlock> make_blocks(int64_t b) const {
    std::vector<QueryBlock> out;
    for (int64_t i0 = 0; i0 < Nq;) {
      int64_t i1 = i0 + 1;
      while (i1 < Nq && i1 - i0 < kTileQ && (!has_segments || qseg[b * Nq + i1] == qseg[b * Nq + i0])) ++i1;
      const QueryBlock run = run_block(b, i0, i1);
      if (!out.empty()) {
        QueryBlock& last = out.back();
        const bool last_sees = last.jhi > last.jlo, run_sees = run.jhi > run.jlo;
        // (a block that sees no key merges only with another such block: its range is empty)
        const QueryBlock merged{last.i0, run.i1, std::min(last.jlo, run.jlo), std::max(last.jhi, run.jhi)};
        if (last_sees == run_sees && merged.rows() <= kTileQ &&
            merged.area() <= last.area() + run.area() + kBlockOverhead) {
          last = merged;
          i0 = i1;
          continue;
        }
      }
      out.push_back(run);
      i0 = i1;
    }
    return out;
  }
};

inline MetaView make_meta(const AttnInputs& in) {
  MetaView m;
  m.Nq = in.Nq;
  m.Nk = in.Nk;
  m.has_segments = in.has_segments;
  m.has_ranks = in.has_ranks;
  auto keep = [&](const at::Tensor& t) {
    m.keep_alive.push_back(t.contiguous());
    return m.keep_alive.back();
  };
  m.valid = keep(in.k_valid).const_data_ptr<bool>();
  if (in.has_segments) {
    m.qseg = keep(in.q_segment).const_data_ptr<int32_t>();
    m.kseg = keep(in.k_segment).const_data_ptr<int32_t>();
  }
  if (in.has_ranks) {
    m.qlim = keep(in.q_limit).const_data_ptr<int32_t>();
    m.krank = keep(in.k_rank).const_data_ptr<int32_t>();
  }
  m.valid_lanes.resize(static_cast<size_t>(in.B * in.Nk));
  for (size_t j = 0; j < m.valid_lanes.size(); ++j) m.valid_lanes[j] = m.valid[j] ? -1 : 0;
  m.blocks.resize(static_cast<size_t>(in.B));
  fourm_fast::parallel_for(0, in.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) m.blocks[b] = m.make_blocks(b);
  });
  return m;
}

// Runs worker(next) on at::parallel_for's threads; next() hands out 0, 1, 2, ... from one shared
// counter (a value >= n: no work left): units of work (one query block of one (batch, head) pair
// in the forward, a chunk of a pair's blocks in the backward) go to whichever thread is free. With a static split into halves, one of the
// 2 EPYC threads sat waiting on the other (libgomp spin in perf); the forward's median was 8-11%
// slower in three interleaved runs at B 8, H 12, N 128 (backward: within noise). Batch rows with
// more padding also cost less. A unit is still computed by one thread alone, so results do not
// depend on the schedule.
template <typename Worker>
void parallel_units(int64_t n, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), n);
  fourm_fast::parallel_for(0, slots, 1, [&](int64_t, int64_t) {
    worker([&]() { return counter.fetch_add(1, std::memory_order_relaxed); });
  });
}

// The forward's units of work: one query block of one (batch, head) pair each, pairs in order.
// Blocks are independent in the forward, so handing them out singly keeps every thread busy when
// there are fewer pairs than threads (one sample's generation step on a many-core CPU); a
// block is still computed by one thread alone, so results do not depend on the schedule.
struct BlockItem {
  int64_t bh;
  const QueryBlock* blk;
};

inline std::vector<BlockItem> forward_items(const MetaView& meta, int64_t B, int64_t H) {
  std::vector<BlockItem> items;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (const QueryBlock& blk : meta.blocks[b]) items.push_back({b * H + h, &blk});
    }
  }
  return items;
}

// The backward's units of work: a (batch, head) pair's blocks cut into `splits` consecutive
// chunks. A block's dQ rows are its own, but every block of a pair adds to the pair's dK and dV:
// with one chunk per pair (the common case, B * H >= kBackwardUnits) a unit writes them straight
// into the output; with more, each chunk accumulates into its own float32 buffer and the chunks
// are summed in chunk order afterwards. splits depends on the shape and the mask's block count,
// never on the thread count, so on fourm_fast's own GEMM kernels the gradients are the same bits
// with any number of threads (not where sgemm_rows hands a product to BLAS: the portable ISA, or
// a sum over more than kSmallGemmMaxK terms, which holds for the forward's P V too). The price is paid on any machine: a split costs
// the buffers and the summing pass, which a CPU with no idle threads gains nothing for. On the
// 4M decoder pattern at B 8, H 6, N 128 (2 chunks) the backward took 39-40 us per pair against
// 28-31 us unsplit, so from 16 pairs there is one chunk.
constexpr int64_t kBackwardUnits = 16;         // units that keep a 16-core CPU busy
constexpr int64_t kMaxSplitBytes = 256 << 20;  // most memory the chunk buffers may take

inline int64_t backward_splits(const MetaView& meta, int64_t pairs, int64_t Nk, int64_t D) {
  if (pairs >= kBackwardUnits || pairs == 0) return 1;
  size_t most_blocks = 1;
  for (const auto& blocks : meta.blocks) most_blocks = std::max(most_blocks, blocks.size());
  const int64_t per_chunk = std::max<int64_t>(1, pairs * 2 * Nk * D * int64_t(sizeof(float)));
  const int64_t by_memory = std::max<int64_t>(1, kMaxSplitBytes / per_chunk);
  return std::min({static_cast<int64_t>(most_blocks), (kBackwardUnits + pairs - 1) / pairs, by_memory});
}

// Blocks [first, last) of chunk c of a batch row with n blocks, out of splits chunks.
inline std::pair<size_t, size_t> chunk_blocks(size_t n, int64_t c, int64_t splits) {
  return {n * static_cast<size_t>(c) / static_cast<size_t>(splits), n * static_cast<size_t>(c + 1) / static_cast<size_t>(splits)};
}

// The first of blocks [lo, hi) that sees any key (it writes its dK / dV range with beta 0; keys
// outside that range are zero-filled first), or null.
inline const QueryBlock* first_seeing(const std::vector<QueryBlock>& blocks, size_t lo, size_t hi) {
  for (size_t i = lo; i < hi; ++i) {
    if (blocks[i].jhi > blocks[i].jlo) return &blocks[i];
  }
  return nullptr;
}

// Unit u of the backward (units = pairs * splits): its pair bh = (b, h), chunk c, the chunk's
// blocks [lo, hi) of batch row b, and the first of them that sees a key.
struct BackwardUnit {
  int64_t bh, c, b, h;
  size_t lo, hi;
  const QueryBlock* first;
};

inline BackwardUnit backward_unit(const MetaView& meta, int64_t u, int64_t splits, int64_t H) {
  BackwardUnit w;
  w.bh = u / splits;
  w.c = u % splits;
  w.b = w.bh / H;
  w.h = w.bh % H;
  const std::vector<QueryBlock>& blocks = meta.blocks[w.b];
  std::tie(w.lo, w.hi) = chunk_blocks(blocks.size(), w.c, splits);
  w.first = first_seeing(blocks, w.lo, w.hi);
  return w;
}

// dst[0:n] = the sum of splits chunks chunk_stride floats apart from src, added in chunk order.
inline void sum_chunks(const float* src, int64_t splits, int64_t chunk_stride, int64_t n, float* dst) {
  std::copy(src, src + n, dst);
  for (int64_t c = 1; c < splits; ++c) {
    const float* part = src + c * chunk_stride;
    for (int64_t i = 0; i < n; ++i) dst[i] += part[i];
  }
}

// dK / dV rows outside the first seeing block's key range start at zero (see first_seeing).
inline void zero_outside(float* dK, float* dV, const QueryBlock* first, int64_t Nk, int64_t D) {
  const int64_t f_lo = first ? first->jlo : Nk, f_hi = first ? first->jhi : Nk;
  std::fill(dK, dK + f_lo * D, 0.0f);
  std::fill(dV, dV + f_lo * D, 0.0f);
  std::fill(dK + f_hi * D, dK + Nk * D, 0.0f);
  std::fill(dV + f_hi * D, dV + Nk * D, 0.0f);
}

// (B, H, N, D) t converted to dtype (a no-op when it has it) with rows the tiles can read in
// place: unit-stride and not overlapping, at any batch, head and row strides (nn.Attention's q, k, v
// are views into one qkv projection, its grad_out a transposed view), else a contiguous copy.
// Reading views in place saves a copy of each operand in the forward and again in the backward.
inline at::Tensor tile_rows(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor d = t.detach().to(dtype);
  const bool rows_ok = d.stride(3) == 1 && (d.size(2) <= 1 || d.stride(2) >= d.size(3));
  return rows_ok ? d : d.contiguous();
}

// Row r of pair (b, h) is at(b, h) + r * ld; ld is a valid GEMM leading dimension (>= D).
template <class T>
struct RowsView {
  const T* base;
  int64_t sb, sh, ld;
  const T* at(int64_t b, int64_t h) const { return base + b * sb + h * sh; }
};

template <class T>
RowsView<T> rows_view(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.size(2) <= 1 ? t.size(3) : t.stride(2)};
}

// A block's score tile and its metadata, as the row passes take it.
inline AttnRowTile row_tile(const MetaView& meta, int64_t b, const QueryBlock& blk, float* s, float scale, float* lse,
                     float* row_sums) {
  const int64_t k0 = b * meta.Nk + blk.jlo, q0 = b * meta.Nq + blk.i0;
  return {s,
          blk.rows(),
          blk.jhi - blk.jlo,
          meta.valid_lanes.data() + k0,
          meta.has_segments ? meta.kseg + k0 : nullptr,
          meta.has_ranks ? meta.krank + k0 : nullptr,
          meta.has_segments ? meta.qseg + q0 : nullptr,
          meta.has_ranks ? meta.qlim + q0 : nullptr,
          scale,
          lse,
          row_sums};
}

}  // namespace attn_cpu
}  // namespace fourm_fast
