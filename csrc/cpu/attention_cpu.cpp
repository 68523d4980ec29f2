// CPU executor of masked_attention (forward and backward). Work is split over (batch, head) pairs
// and their query blocks (MetaView::make_blocks), handed to threads as they come free
// (parallel_units; both in attention_cpu_blocks.h): single blocks in the forward, each pair's
// blocks in the backward, cut into chunks summed in a fixed order under 16 pairs
// (backward_splits). Blocks are runs of one segment, at most kTileQ
// rows, each with the exact range of keys its queries may see (tokens of a modality are contiguous
// in 4M's layout, so a decoder block meets one modality's keys). A block's scores are one product
// (rows x key range, never N x N) on raw pointers into per-thread scratch (sgemm_rows: fourm_fast's
// AVX2 / AVX-512 GEMM or BLAS, no ATen call per product); the row passes (attention_cpu_rows.h)
// apply the mask from per-token metadata and the exponentials, and the rest follows flash
// attention's algebra: logsumexp saved in the forward pass, probabilities recomputed in the
// backward pass. bfloat16 inputs on a CPU with AMX take the same blocks on AMX tiles
// (attention_cpu_amx_tiles.cpp); other 16-bit inputs are widened to float32 here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../attention_checks.h"
#include "../kernels/attention_math.h"
#include "attention_cpu_amx_tiles.h"
#include "attention_cpu_blocks.h"
#include "attention_cpu_rows_dispatch.h"
#include "cpu_gemm.h"
#include "cpu_isa.h"
#include "parallel.h"

namespace fourm_fast {
namespace {

using namespace attn_cpu;

// Loops of the direct (decoding-step) path below, in vectors of the GCC/Clang extension: plain
// loops, even with eight scalar partial sums, compiled to a serial add chain. The tiles' row passes
// live in attention_cpu_rows.h.
typedef float f32x8 __attribute__((vector_size(32)));

// Eight values of a K or V row as floats (16-bit types widen exactly, so a bfloat16 cache read in
// place gives the bits its float32 copy would).
// (An out-parameter: returning a 32-byte vector by value from this non-AVX file changes the ABI.)
template <class T>
inline void load8(const T* p, f32x8& v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);  // unaligned load
  } else {
    for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  }
}

template <class T>
inline float dot_lanes(const float* a, const T* b, int64_t n) {
  f32x8 acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    f32x8 x, y;
    std::memcpy(&x, a + d, sizeof x);
    load8(b + d, y);
    acc += x * y;
  }
  float tail = 0.0f;
  for (; d < n; ++d) tail += a[d] * static_cast<float>(b[d]);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// acc[0:n] += w * x[0:n]; acc is a private scratch row, so nothing aliases it.
template <class T>
inline void axpy_lanes(float* __restrict acc, float w, const T* __restrict x, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    f32x8 a, y;
    std::memcpy(&a, acc + d, sizeof a);
    load8(x + d, y);
    a += w * y;
    std::memcpy(acc + d, &a, sizeof a);
  }
  for (; d < n; ++d) acc[d] += w * static_cast<float>(x[d]);
}

// Queries per (batch, head) up to which the forward pass uses the direct loops instead of the BLAS
// tiles. Measured forward, H = 6, d = 64, 2 threads, min of 15 x 20 calls: one query (a decoding
// step) is faster direct (B 4, Nk 197: 193-229 us against 211-330; B 8, Nk 20: 49-66 against
// 101-129); from 4 queries the tiles win (B 8, Nk 200: Nq 4 862-1030 us against 1242-1483, Nq 8
// 1042-1468 against 2305-3118).
constexpr int64_t kDirectMaxQ = 1;

// float32 copies (or the inputs themselves) for the float32 tiles: see tile_rows.
at::Tensor float_rows(const at::Tensor& t) { return tile_rows(t, at::kFloat); }

// Forward for few queries (an autoregressive decoding step), straight from the strided inputs:
// per query, the list of its visible keys, their scores and max, then exp-weights and the
// weighted sum of values (the same algebra as the tiles, without a BLAS call per tile). K and V
// (the key/value cache) are read in their own dtype, widened per element: a bfloat16 cache is not
// copied to float32 on every step. kf and vf have unit stride along D.
template <class T>
void forward_direct(const MetaView& meta, const AttnInputs& in, const at::Tensor& qf, const at::Tensor& kf,
                    const at::Tensor& vf, at::Tensor& out, at::Tensor& lse, float scale) {
  const float* qp = qf.const_data_ptr<float>();
  const T* kp = kf.const_data_ptr<T>();
  const T* vp = vf.const_data_ptr<T>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t D = in.D, Nq = in.Nq, Nk = in.Nk, H = in.H;
  const int64_t qs0 = qf.stride(0), qs1 = qf.stride(1), qs2 = qf.stride(2);
  const int64_t ks0 = kf.stride(0), ks1 = kf.stride(1), ks2 = kf.stride(2);
  const int64_t vs0 = vf.stride(0), vs1 = vf.stride(1), vs2 = vf.stride(2);
  fourm_fast::parallel_for(0, in.B * H, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<float> score(static_cast<size_t>(Nk));
    std::vector<int64_t> keys(static_cast<size_t>(Nk));
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* K = kp + b * ks0 + h * ks1;
      const T* V = vp + b * vs0 + h * vs1;
      for (int64_t i = 0; i < Nq; ++i) {
        const float* qi = qp + b * qs0 + h * qs1 + i * qs2;
        int64_t n = 0;
        for (int64_t j = 0; j < Nk; ++j) {
          if (meta.visible(b, i, j)) keys[n++] = j;
        }
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          score[t] = dot_lanes(qi, K + keys[t] * ks2, D) * scale;
          mx = std::max(mx, score[t]);
        }
        if (mx == -INFINITY) n = 0;  // every visible score is -inf: no weight, as for no key (not NaN)
        std::fill(acc.begin(), acc.end(), 0.0f);
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
          const float w = std::exp(score[t] - mx);
          sum += w;
          axpy_lanes(acc.data(), w, V + keys[t] * vs2, D);
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        float* oi = op + ((b * H + h) * Nq + i) * D;
        for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] * inv;
        lp[(b * H + h) * Nq + i] = kernels::attn_lse(mx, sum);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_valid,
    const std::optional<at::Tensor>& q_segment, const std::optional<at::Tensor>& k_segment,
    const std::optional<at::Tensor>& q_limit, const std::optional<at::Tensor>& k_rank, double scale_d) {
  const AttnInputs in = check_attention_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "masked_attention (CPU): inputs must be CPU tensors");
  // The ATen calls below are implementation, not graph: inputs are detached (parallel_for workers
  // would not inherit a dispatch guard).
  const float scale = static_cast<float>(scale_d);
  at::Tensor out = at::empty({in.B, in.H, in.Nq, in.D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({in.B, in.H, in.Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out.to(q.scalar_type()), lse};
  const MetaView meta = make_meta(in);
  if (in.Nq <= kDirectMaxQ) {
    const at::Tensor kd = k.stride(3) == 1 ? k.detach() : k.detach().contiguous();
    const at::Tensor vd = v.stride(3) == 1 ? v.detach() : v.detach().contiguous();
    switch (q.scalar_type()) {
      case at::kBFloat16: forward_direct<c10::BFloat16>(meta, in, float_rows(q), kd, vd, out, lse, scale); break;
      case at::kHalf: forward_direct<c10::Half>(meta, in, float_rows(q), kd, vd, out, lse, scale); break;
      default: forward_direct<float>(meta, in, float_rows(q), float_rows(k), float_rows(v), out, lse, scale);
    }
    return {out.to(q.scalar_type()), lse};
  }
#ifdef FOURM_FAST_WITH_AMX
  if (q.scalar_type() == at::kBFloat16 && cpu_isa_allows_amx()) return masked_attention_fwd_amx(meta, in, scale);
#endif
  const at::Tensor qf = float_rows(q), kf = float_rows(k), vf = float_rows(v);
  const int64_t D = in.D, Nq = in.Nq, Nk = in.Nk;
  const RowsView<float> qv = rows_view<float>(qf), kv = rows_view<float>(kf), vv = rows_view<float>(vf);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const AttnRowKernels rows = attn_row_kernels();
  const std::vector<BlockItem> items = forward_items(meta, in.B, in.H);
  const int64_t n_items = static_cast<int64_t>(items.size());
  parallel_units(n_items, [&](const auto& next) {
    std::vector<float> P(static_cast<size_t>(std::min(kTileQ, Nq) * Nk));  // one tile's scores
    float sums[kTileQ];
    for (int64_t it = next(); it < n_items; it = next()) {
      const int64_t bh = items[it].bh, b = bh / in.H, h = bh % in.H;
      const float* Q = qv.at(b, h);
      const float* K = kv.at(b, h);
      const float* V = vv.at(b, h);
      float* O = op + bh * Nq * D;
      float* L = lp + bh * Nq;
      const QueryBlock& blk = *items[it].blk;
      const int64_t i0 = blk.i0, tq = blk.rows(), jlo = blk.jlo, jhi = blk.jhi;
      float* o_tile = O + i0 * D;
      if (jhi == jlo) {  // no query of the tile sees any key
        std::fill(o_tile, o_tile + tq * D, 0.0f);
        std::fill(L + i0, L + i0 + tq, -INFINITY);
        continue;
      }
      const int64_t nk = jhi - jlo;
      sgemm_rows(false, true, tq, nk, D, 1.0f, Q + i0 * qv.ld, qv.ld, K + jlo * kv.ld, kv.ld, 0.0f, P.data(), nk);
      rows.softmax_fwd(row_tile(meta, b, blk, P.data(), scale, L + i0, sums));
      sgemm_rows(false, false, tq, D, nk, 1.0f, P.data(), nk, V + jlo * vv.ld, vv.ld, 0.0f, o_tile, D);
      // Rows were exp(s - max); normalise by their sums: exp(s - lse) = exp(s - max) / sum.
      for (int64_t r = 0; r < tq; ++r) {
        const float inv = sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
        float* orow = o_tile + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
      }
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& k_valid, const std::optional<at::Tensor>& q_segment,
    const std::optional<at::Tensor>& k_segment, const std::optional<at::Tensor>& q_limit,
    const std::optional<at::Tensor>& k_rank, double scale_d) {
  const AttnInputs in = check_attention_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "masked_attention (CPU): inputs must be CPU tensors");
  // The ATen calls below are implementation, not graph: inputs are detached (parallel_for workers
  // would not inherit a dispatch guard).
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "masked_attention backward: grad_out and out must have q's shape ", q.sizes());
  // (either may differ from q's dtype here, e.g. a float32 grad_out beside bf16 q: both are read
  // widened to float32; anything else would be read wrongly or lose precision)
  for (const at::Tensor* t : {&grad_out, &out}) {
    const auto st = t->scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                     "masked_attention backward: grad_out and out must be float32, bfloat16 or float16, got ", st);
    TORCH_CHECK_VALUE(t->device() == q.device(), "masked_attention backward: grad_out and out must be on q's device");
  }
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == in.B && lse.size(1) == in.H && lse.size(2) == in.Nq &&
                        lse.scalar_type() == at::kFloat,
                    "masked_attention backward: lse must be float32 (B, H, Nq)");
  const float scale = static_cast<float>(scale_d);
#ifdef FOURM_FAST_WITH_AMX
  if (q.scalar_type() == at::kBFloat16 && grad_out.scalar_type() == at::kBFloat16 &&
      out.scalar_type() == at::kBFloat16 && cpu_isa_allows_amx() && grad_out.numel() > 0) {
    return masked_attention_bwd_amx(make_meta(in), in, grad_out, out, lse, scale);
  }
#endif
  const at::Tensor qf = float_rows(q), kf = float_rows(k), vf = float_rows(v), of = float_rows(out),
                   gf = float_rows(grad_out), lf = lse.contiguous();
  // Not zero-filled here: each unit initialises its own dK / dV slices (cache-warm, in parallel,
  // no separate pass over the gradients), or, when pairs are split into chunks, the chunks' sum
  // writes them; every dQ row is written once by its block.
  at::Tensor dq = at::empty({in.B, in.H, in.Nq, in.D}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty({in.B, in.H, in.Nk, in.D}, q.options().dtype(at::kFloat));
  at::Tensor dv = at::empty({in.B, in.H, in.Nk, in.D}, q.options().dtype(at::kFloat));
  const MetaView meta = make_meta(in);
  const int64_t D = in.D, Nq = in.Nq, Nk = in.Nk;
  const RowsView<float> qv = rows_view<float>(qf), kv = rows_view<float>(kf), vv = rows_view<float>(vf),
                       ov = rows_view<float>(of), gv = rows_view<float>(gf);
  const float* lp = lf.const_data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const AttnRowKernels rows = attn_row_kernels();
  const int64_t pairs = in.B * in.H, splits = backward_splits(meta, pairs, Nk, D), units = pairs * splits;
  // splits > 1: chunk c of pair bh accumulates into parts[bh][c][0 (dK) / 1 (dV)]
  at::Tensor parts = splits > 1 ? at::empty({pairs, splits, 2, Nk, D}, dk.options()) : at::Tensor();
  parallel_units(units, [&](const auto& next) {
    const size_t tile = static_cast<size_t>(std::min(kTileQ, Nq) * Nk);
    std::vector<float> P(tile), dS(tile), lse_rows(static_cast<size_t>(kTileQ));
    for (int64_t u = next(); u < units; u = next()) {
      const BackwardUnit w = backward_unit(meta, u, splits, in.H);
      const int64_t bh = w.bh, b = w.b, h = w.h;
      const float *Q = qv.at(b, h), *K = kv.at(b, h), *V = vv.at(b, h), *O = ov.at(b, h), *G = gv.at(b, h),
                  *L = lp + bh * Nq;
      float* dQ = dqp + bh * Nq * D;
      float* dK = splits > 1 ? parts.data_ptr<float>() + u * 2 * Nk * D : dkp + bh * Nk * D;
      float* dV = splits > 1 ? dK + Nk * D : dvp + bh * Nk * D;
      // dK and dV accumulate over the chunk's blocks that see each key. The first block that sees
      // any key writes its key range with beta 0 (at 128 queries it is the only block): only the
      // keys outside that range are zero-filled first.
      const std::vector<QueryBlock>& blocks = meta.blocks[b];
      const QueryBlock* first = w.first;
      zero_outside(dK, dV, first, Nk, D);
      for (size_t bi = w.lo; bi < w.hi; ++bi) {
        const QueryBlock& blk = blocks[bi];
        const int64_t i0 = blk.i0, tq = blk.rows(), jlo = blk.jlo, jhi = blk.jhi;
        if (jhi == jlo) {  // invisible rows: zero gradients
          std::fill(dQ + i0 * D, dQ + (i0 + tq) * D, 0.0f);
          continue;
        }
        const int64_t nk = jhi - jlo;
        const float *q_t = Q + i0 * qv.ld, *g_t = G + i0 * gv.ld, *o_t = O + i0 * ov.ld, *k_r = K + jlo * kv.ld,
                    *v_r = V + jlo * vv.ld;
        sgemm_rows(false, true, tq, nk, D, 1.0f, q_t, qv.ld, k_r, kv.ld, 0.0f, P.data(), nk);
        std::copy(L + i0, L + i0 + tq, lse_rows.begin());
        rows.probs_bwd(row_tile(meta, b, blk, P.data(), scale, lse_rows.data(), nullptr));
        const float acc = &blk == first ? 0.0f : 1.0f;  // beta: write or accumulate dK, dV
        sgemm_rows(true, false, nk, D, tq, 1.0f, P.data(), nk, g_t, gv.ld, acc, dV + jlo * D, D);  // dV += P^T dO
        sgemm_rows(false, true, tq, nk, D, 1.0f, g_t, gv.ld, v_r, vv.ld, 0.0f, dS.data(), nk);      // dP = dO V^T
        rows.dscores(dS.data(), P.data(), g_t, gv.ld, o_t, ov.ld, tq, nk, D);
        sgemm_rows(false, false, tq, D, nk, scale, dS.data(), nk, k_r, kv.ld, 0.0f, dQ + i0 * D, D);  // dQ = s dS K
        sgemm_rows(true, false, nk, D, tq, scale, dS.data(), nk, q_t, qv.ld, acc, dK + jlo * D, D);  // dK += s dS^T Q
      }
    }
  });
  if (splits > 1) {  // dK, dV = the chunks' sums, in chunk order
    const float* pp = parts.const_data_ptr<float>();
    const int64_t n = Nk * D;
    fourm_fast::parallel_for(0, pairs * 2, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / 2, which = t % 2;
        sum_chunks(pp + (bh * splits * 2 + which) * n, splits, 2 * n, n, (which == 0 ? dkp : dvp) + bh * n);
      }
    });
  }
  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CPU, m) {
  m.impl("masked_attention_fwd", &masked_attention_fwd_cpu);
  m.impl("masked_attention_bwd", &masked_attention_bwd_cpu);
}

}  // namespace fourm_fast
