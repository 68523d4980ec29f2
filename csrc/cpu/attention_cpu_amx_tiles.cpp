// See attention_cpu_amx_tiles.h. The loops mirror masked_attention_{fwd,bwd}_cpu's tiles
// (attention_cpu.cpp); what differs is the operand type of each product and where results land:
// bfloat16 outputs are written block by block from float32 scratch, and dK / dV accumulate per
// unit of work in float32 scratch before one conversion.
#include "attention_cpu_amx_tiles.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "attention_cpu_rows_dispatch.h"
#include "bf16_gemm.h"
#include "parallel.h"

namespace fourm_fast {

#ifdef FOURM_FAST_WITH_AMX
namespace {

using namespace attn_cpu;
using BF16 = c10::BFloat16;

at::Tensor bf16_rows(const at::Tensor& t) { return tile_rows(t, at::kBFloat16); }

Bf16GemmOperand bf16_operand(const BF16* p, int64_t ld, bool trans) { return {p, ld, trans, false}; }
Bf16GemmOperand f32_operand(const float* p, int64_t ld, bool trans, float scale = 1.0f) {
  return {p, ld, trans, true, scale};
}

// Per-thread GEMM scratch, 64-byte aligned, for every product of a pair with at most rows
// queries per block and nk keys.
struct GemmScratch {
  std::vector<char> buf;
  void* ptr = nullptr;
  GemmScratch(int64_t rows, int64_t nk, int64_t D) {
    const size_t bytes = std::max({bf16_gemm_scratch_bytes(rows, nk, D), bf16_gemm_scratch_bytes(rows, D, nk),
                                   bf16_gemm_scratch_bytes(nk, D, rows)});
    buf.resize(bytes + 64);
    ptr = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
  }
};

// rows x D float32 (row stride D) -> bfloat16 rows (row stride ld), each scaled by its factor.
void store_rows(const float* src, int64_t rows, int64_t D, const float* row_scale, BF16* dst, int64_t ld) {
  f32_to_bf16_rows(src, D, rows, D, row_scale, reinterpret_cast<uint16_t*>(dst), ld);
}

// rows x D bfloat16 (row stride ld) -> float32 (row stride D): exact.
void widen_rows(const BF16* src, int64_t ld, int64_t rows, int64_t D, float* dst) {
  bf16_to_f32_rows(reinterpret_cast<const uint16_t*>(src), ld, rows, D, dst, D);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd_amx(const MetaView& meta, const AttnInputs& in, float scale) {
  const at::Tensor qb = bf16_rows(in.q), kb = bf16_rows(in.k), vb = bf16_rows(in.v);
  const int64_t D = in.D, Nq = in.Nq, Nk = in.Nk;
  at::Tensor out = at::empty({in.B, in.H, Nq, D}, in.q.options());
  at::Tensor lse = at::empty({in.B, in.H, Nq}, in.q.options().dtype(at::kFloat));
  const RowsView<BF16> qv = rows_view<BF16>(qb), kv = rows_view<BF16>(kb), vv = rows_view<BF16>(vb);
  BF16* op = out.data_ptr<BF16>();
  float* lp = lse.data_ptr<float>();
  const AttnRowKernels rows = attn_row_kernels();
  const int64_t max_rows = std::min(kTileQ, Nq);
  const std::vector<BlockItem> items = forward_items(meta, in.B, in.H);
  const int64_t n_items = static_cast<int64_t>(items.size());
  parallel_units(n_items, [&](const auto& next) {
    std::vector<float> P(static_cast<size_t>(max_rows * Nk)), o_tile(static_cast<size_t>(max_rows * D));
    float sums[kTileQ];
    GemmScratch scratch(max_rows, Nk, D);
    for (int64_t it = next(); it < n_items; it = next()) {
      const int64_t bh = items[it].bh, b = bh / in.H, h = bh % in.H;
      const BF16 *Q = qv.at(b, h), *K = kv.at(b, h), *V = vv.at(b, h);
      BF16* O = op + bh * Nq * D;
      float* L = lp + bh * Nq;
      const QueryBlock& blk = *items[it].blk;
      const int64_t i0 = blk.i0, tq = blk.rows(), jlo = blk.jlo, nk = blk.jhi - blk.jlo;
      if (nk == 0) {  // no query of the block sees any key
        std::fill(O + i0 * D, O + (i0 + tq) * D, BF16(0.0f));
        std::fill(L + i0, L + i0 + tq, -INFINITY);
        continue;
      }
      bf16_gemm_amx(tq, nk, D, 1.0f, bf16_operand(Q + i0 * qv.ld, qv.ld, false),
                    bf16_operand(K + jlo * kv.ld, kv.ld, true), 0.0f, P.data(), nk, scratch.ptr);
      rows.softmax_fwd(row_tile(meta, b, blk, P.data(), scale, L + i0, sums));
      bf16_gemm_amx(tq, D, nk, 1.0f, f32_operand(P.data(), nk, false), bf16_operand(V + jlo * vv.ld, vv.ld, false),
                    0.0f, o_tile.data(), D, scratch.ptr);
      // Rows were exp(s - max); normalise by their sums: exp(s - lse) = exp(s - max) / sum.
      for (int64_t r = 0; r < tq; ++r) sums[r] = sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
      store_rows(o_tile.data(), tq, D, sums, O + i0 * D, D);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_amx(const MetaView& meta, const AttnInputs& in,
                                                                        const at::Tensor& grad_out,
                                                                        const at::Tensor& out, const at::Tensor& lse,
                                                                        float scale) {
  const at::Tensor qb = bf16_rows(in.q), kb = bf16_rows(in.k), vb = bf16_rows(in.v), ob = bf16_rows(out),
                   gb = bf16_rows(grad_out), lf = lse.contiguous();
  const int64_t D = in.D, Nq = in.Nq, Nk = in.Nk;
  at::Tensor dq = at::empty({in.B, in.H, Nq, D}, in.q.options());
  at::Tensor dk = at::empty({in.B, in.H, Nk, D}, in.q.options());
  at::Tensor dv = at::empty({in.B, in.H, Nk, D}, in.q.options());
  const RowsView<BF16> qv = rows_view<BF16>(qb), kv = rows_view<BF16>(kb), vv = rows_view<BF16>(vb),
                      ov = rows_view<BF16>(ob), gv = rows_view<BF16>(gb);
  const float* lp = lf.const_data_ptr<float>();
  BF16 *dqp = dq.data_ptr<BF16>(), *dkp = dk.data_ptr<BF16>(), *dvp = dv.data_ptr<BF16>();
  const AttnRowKernels rows = attn_row_kernels();
  const int64_t pairs = in.B * in.H, max_rows = std::min(kTileQ, Nq);
  const int64_t splits = backward_splits(meta, pairs, Nk, D), units = pairs * splits;
  // splits > 1: chunk c of pair bh accumulates into parts[bh][c][0 (dK) / 1 (dV)], float32
  // (every element is written by its unit: allocated without the zero fill a vector would do)
  std::unique_ptr<float[]> parts(splits > 1 ? new float[static_cast<size_t>(units * 2 * Nk * D)] : nullptr);
  parallel_units(units, [&](const auto& next) {
    const size_t tile = static_cast<size_t>(max_rows * Nk), rows_d = static_cast<size_t>(max_rows * D);
    std::vector<float> P(tile), dS(tile), lse_rows(static_cast<size_t>(kTileQ));
    std::vector<float> g32(rows_d), o32(rows_d), dq32(rows_d);
    std::vector<float> own(splits > 1 ? 0 : static_cast<size_t>(2 * Nk * D));  // this thread's dK, dV
    GemmScratch scratch(max_rows, Nk, D);
    for (int64_t u = next(); u < units; u = next()) {
      const BackwardUnit w = backward_unit(meta, u, splits, in.H);
      const int64_t bh = w.bh, b = w.b, h = w.h;
      const BF16 *Q = qv.at(b, h), *K = kv.at(b, h), *V = vv.at(b, h), *O = ov.at(b, h), *G = gv.at(b, h);
      const float* L = lp + bh * Nq;
      BF16* dQ = dqp + bh * Nq * D;
      float* dK = splits > 1 ? parts.get() + u * 2 * Nk * D : own.data();
      float* dV = dK + Nk * D;
      // dK and dV accumulate over the chunk's blocks that see each key, in float32: the first
      // block that sees any key writes its key range with beta 0, keys outside it start at zero.
      const std::vector<QueryBlock>& blocks = meta.blocks[b];
      const QueryBlock* first = w.first;
      zero_outside(dK, dV, first, Nk, D);
      for (size_t bi = w.lo; bi < w.hi; ++bi) {
        const QueryBlock& blk = blocks[bi];
        const int64_t i0 = blk.i0, tq = blk.rows(), jlo = blk.jlo, nk = blk.jhi - blk.jlo;
        if (nk == 0) {  // invisible rows: zero gradients
          std::fill(dQ + i0 * D, dQ + (i0 + tq) * D, BF16(0.0f));
          continue;
        }
        const BF16 *q_t = Q + i0 * qv.ld, *g_t = G + i0 * gv.ld, *k_r = K + jlo * kv.ld, *v_r = V + jlo * vv.ld;
        bf16_gemm_amx(tq, nk, D, 1.0f, bf16_operand(q_t, qv.ld, false), bf16_operand(k_r, kv.ld, true), 0.0f,
                      P.data(), nk, scratch.ptr);
        std::copy(L + i0, L + i0 + tq, lse_rows.begin());
        rows.probs_bwd(row_tile(meta, b, blk, P.data(), scale, lse_rows.data(), nullptr));
        const float acc = &blk == first ? 0.0f : 1.0f;  // beta: write or accumulate dK, dV
        bf16_gemm_amx(nk, D, tq, 1.0f, f32_operand(P.data(), nk, true), bf16_operand(g_t, gv.ld, false), acc,
                      dV + jlo * D, D, scratch.ptr);  // dV += P^T dO
        bf16_gemm_amx(tq, nk, D, 1.0f, bf16_operand(g_t, gv.ld, false), bf16_operand(v_r, vv.ld, true), 0.0f,
                      dS.data(), nk, scratch.ptr);  // dP = dO V^T
        widen_rows(g_t, gv.ld, tq, D, g32.data());
        widen_rows(O + i0 * ov.ld, ov.ld, tq, D, o32.data());
        rows.dscores(dS.data(), P.data(), g32.data(), D, o32.data(), D, tq, nk, D);
        // (the scale goes into dS as it is rounded: alpha 1 lets the tiles store straight into C)
        bf16_gemm_amx(tq, D, nk, 1.0f, f32_operand(dS.data(), nk, false, scale), bf16_operand(k_r, kv.ld, false), 0.0f,
                      dq32.data(), D, scratch.ptr);  // dQ = s dS K
        store_rows(dq32.data(), tq, D, nullptr, dQ + i0 * D, D);
        bf16_gemm_amx(nk, D, tq, 1.0f, f32_operand(dS.data(), nk, true, scale), bf16_operand(q_t, qv.ld, false), acc,
                      dK + jlo * D, D, scratch.ptr);  // dK += s dS^T Q
      }
      if (splits == 1) {
        store_rows(dK, Nk, D, nullptr, dkp + bh * Nk * D, D);
        store_rows(dV, Nk, D, nullptr, dvp + bh * Nk * D, D);
      }
    }
  });
  if (splits > 1) {  // dK, dV = the chunks' sums in chunk order, rounded once
    const int64_t n = Nk * D;
    fourm_fast::parallel_for(0, pairs * 2, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> sum(static_cast<size_t>(n));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / 2, which = t % 2;
        sum_chunks(parts.get() + (bh * splits * 2 + which) * n, splits, 2 * n, n, sum.data());
        store_rows(sum.data(), Nk, D, nullptr, (which == 0 ? dkp : dvp) + bh * n, D);
      }
    });
  }
  return {dq, dk, dv};
}

#endif  // FOURM_FAST_WITH_AMX

}  // namespace fourm_fast
