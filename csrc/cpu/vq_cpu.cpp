// CPU executor of vq_lookup: a register-blocked GEMM (6 rows x 16 codes per micro-kernel call,
// fp32 FMA) whose epilogue turns dot products into scores (csrc/kernels/vq_math.h) and folds them
// into a running per-lane argmin, so the N x K distance matrix never exists. Rows are processed in
// blocks sized for L2 and spread over threads with at::parallel_for. bfloat16 inputs on a CPU
// with AMX take the same scheme on AMX tiles (vq_amx.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FF_HAVE_X86 1
#endif

#include "../kernels/vq_math.h"
#include "../vq_checks.h"
#include "cpu_isa.h"
#include "parallel.h"
#include "vq_amx.h"

namespace fourm_fast {
namespace {

using kernels::VqMetric;

constexpr int kMr = 6;      // rows per micro-kernel
constexpr int kNr = 16;     // codes per micro-kernel (two 8-lane vectors)
constexpr int kLanes = 8;   // the running argmin keeps one candidate per lane
// Packed rows per block: up to 96 KiB, so they stay in L2 while every code panel streams past them
// once. For D = 256 that is 16 row panels per trip through the codebook (a 16 KiB-only budget gave
// 2 and made the search L3-bound).
constexpr int64_t kRowBlockFloats = 24576;

// Best candidate per lane for one row. Lane l sees codes l, l+8, l+16, ... in increasing order,
// and a strict '<' keeps the first of equal scores, so each lane holds its smallest tied index.
struct alignas(32) LaneBest {
  float score[kLanes];
  int32_t index[kLanes];
};

using PanelKernel = void (*)(const float* a, const float* b, const float* bias, int64_t D,
                             float scale, int32_t code_base, LaneBest* best);

// a: packed rows [D][kMr], b: packed codes [D][kNr], bias: [kNr], best: [kMr].
void panel_generic(const float* a, const float* b, const float* bias, int64_t D, float scale,
                   int32_t code_base, LaneBest* best) {
  float acc[kMr][kNr] = {};
  for (int64_t d = 0; d < D; ++d) {
    for (int r = 0; r < kMr; ++r) {
      const float ar = a[d * kMr + r];
      for (int c = 0; c < kNr; ++c) acc[r][c] += ar * b[d * kNr + c];
    }
  }
  for (int r = 0; r < kMr; ++r) {
    for (int c = 0; c < kNr; ++c) {
      const float s = kernels::vq_score(bias[c], scale, acc[r][c]);
      const int lane = c % kLanes;
      if (s < best[r].score[lane]) {
        best[r].score[lane] = s;
        best[r].index[lane] = code_base + c;
      }
    }
  }
}

#ifdef FF_HAVE_X86
__attribute__((target("avx2,fma"))) inline void fold_row_avx2(LaneBest& best, __m256 s0, __m256 s1,
                                                              __m256i i0, __m256i i1) {
  __m256 bv = _mm256_load_ps(best.score);
  __m256 bi = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(best.index)));
  __m256 m = _mm256_cmp_ps(s0, bv, _CMP_LT_OQ);
  bv = _mm256_blendv_ps(bv, s0, m);
  bi = _mm256_blendv_ps(bi, _mm256_castsi256_ps(i0), m);
  m = _mm256_cmp_ps(s1, bv, _CMP_LT_OQ);
  bv = _mm256_blendv_ps(bv, s1, m);
  bi = _mm256_blendv_ps(bi, _mm256_castsi256_ps(i1), m);
  _mm256_store_ps(best.score, bv);
  _mm256_store_si256(reinterpret_cast<__m256i*>(best.index), _mm256_castps_si256(bi));
}

// 12 accumulators + 2 code vectors + 1 broadcast = 15 of the 16 ymm registers.
__attribute__((target("avx2,fma"))) void panel_avx2(const float* a, const float* b,
                                                    const float* bias, int64_t D, float scale,
                                                    int32_t code_base, LaneBest* best) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_loadu_ps(b + d * kNr);
    const __m256 b1 = _mm256_loadu_ps(b + d * kNr + 8);
    const float* ad = a + d * kMr;
    __m256 ar = _mm256_broadcast_ss(ad + 0);
    c00 = _mm256_fmadd_ps(ar, b0, c00);
    c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(ad + 1);
    c10 = _mm256_fmadd_ps(ar, b0, c10);
    c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(ad + 2);
    c20 = _mm256_fmadd_ps(ar, b0, c20);
    c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(ad + 3);
    c30 = _mm256_fmadd_ps(ar, b0, c30);
    c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(ad + 4);
    c40 = _mm256_fmadd_ps(ar, b0, c40);
    c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(ad + 5);
    c50 = _mm256_fmadd_ps(ar, b0, c50);
    c51 = _mm256_fmadd_ps(ar, b1, c51);
  }
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 bias0 = _mm256_loadu_ps(bias), bias1 = _mm256_loadu_ps(bias + 8);
  const __m256i i0 = _mm256_add_epi32(_mm256_set1_epi32(code_base),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
  // Same rounding as kernels::vq_score: one fused multiply-add.
  fold_row_avx2(best[0], _mm256_fmadd_ps(vs, c00, bias0), _mm256_fmadd_ps(vs, c01, bias1), i0, i1);
  fold_row_avx2(best[1], _mm256_fmadd_ps(vs, c10, bias0), _mm256_fmadd_ps(vs, c11, bias1), i0, i1);
  fold_row_avx2(best[2], _mm256_fmadd_ps(vs, c20, bias0), _mm256_fmadd_ps(vs, c21, bias1), i0, i1);
  fold_row_avx2(best[3], _mm256_fmadd_ps(vs, c30, bias0), _mm256_fmadd_ps(vs, c31, bias1), i0, i1);
  fold_row_avx2(best[4], _mm256_fmadd_ps(vs, c40, bias0), _mm256_fmadd_ps(vs, c41, bias1), i0, i1);
  fold_row_avx2(best[5], _mm256_fmadd_ps(vs, c50, bias0), _mm256_fmadd_ps(vs, c51, bias1), i0, i1);
}

#endif

PanelKernel select_kernel() {
#ifdef FF_HAVE_X86
  if (cpu_isa_allows_avx2()) return panel_avx2;
#endif
  return panel_generic;
}

// Codebook packed as panels of kNr codes, [panel][D][kNr], plus one bias per code. Padding codes
// get bias +inf, so they can never win.
struct PackedCodebook {
  at::Tensor values;  // float32 [panels * D * kNr]
  at::Tensor bias;    // float32 [panels * kNr]
  int64_t panels = 0;
};

template <typename scalar_t>
PackedCodebook pack_codebook(const at::Tensor& codebook, VqMetric metric) {
  const int64_t K = codebook.size(0), D = codebook.size(1);
  const int64_t s0 = codebook.stride(0), s1 = codebook.stride(1);
  const scalar_t* src = codebook.const_data_ptr<scalar_t>();
  PackedCodebook packed;
  packed.panels = (K + kNr - 1) / kNr;
  packed.values = at::zeros({packed.panels * D * kNr}, codebook.options().dtype(at::kFloat));
  packed.bias = at::full({packed.panels * kNr}, kernels::positive_infinity_f32(),
                         codebook.options().dtype(at::kFloat));
  float* values = packed.values.data_ptr<float>();
  float* bias = packed.bias.data_ptr<float>();
  fourm_fast::parallel_for(0, K, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t* row = src + j * s0;
      float sum_sq = 0.0f;
      bool finite = true;
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(row[d * s1]);
        finite = finite && kernels::is_finite_f32(v);
        sum_sq = fmaf(v, v, sum_sq);
      }
      const kernels::VqCodePrep prep = kernels::vq_prepare_code(sum_sq, finite, metric);
      bias[j] = prep.bias;
      if (!finite) continue;  // leave zeros: the +inf bias already excludes the code
      float* dst = values + (j / kNr) * D * kNr + (j % kNr);
      // Prepared codes are rounded to the input dtype, as the CUDA executor stores them for its
      // tensor cores, so both executors rank the same numbers (a no-op for float32, and for l2,
      // whose divisor is 1).
      for (int64_t d = 0; d < D; ++d) {
        dst[d * kNr] = static_cast<float>(static_cast<scalar_t>(kernels::vq_prepared_entry(static_cast<float>(row[d * s1]), prep)));
      }
    }
  });
  return packed;
}

#ifdef FOURM_FAST_WITH_AMX
// bfloat16 rows and codes on AMX tiles (vq_amx.h): the same prepared codebook (its float32 panels
// recast into the tiles' pair layout), blocks of rows spread over threads, the same finalisation.
constexpr int64_t kAmxRowsPerBlock = 256;  // a multiple of 32; 16 KiB of lane minima per block

// False (nothing written) when some row or code is too small for the tiles (vq_amx.h).
bool vq_lookup_amx(const at::Tensor& x2, const at::Tensor& codebook, const PackedCodebook& packed, VqMetric metric,
                   int64_t* out_index, float* out_distance) {
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const int64_t N = xc.size(0), D = xc.size(1), xs0 = xc.stride(0);
  const int64_t cs0 = codebook.stride(0), cs1 = codebook.stride(1);
  const c10::BFloat16* x = xc.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* cb = codebook.const_data_ptr<c10::BFloat16>();
  if (!vq_amx_codes_in_range(packed.values.const_data_ptr<float>(), packed.panels, D)) return false;
  std::atomic<bool> rows_ok{true};
  fourm_fast::parallel_for(0, N, 1024, [&](int64_t r0, int64_t r1) {
    if (!vq_amx_rows_in_range(reinterpret_cast<const uint16_t*>(x + r0 * xs0), xs0, r1 - r0, D)) rows_ok = false;
  });
  if (!rows_ok) return false;
  std::vector<uint32_t> codes(vq_amx_codebook_words(packed.panels, D));
  vq_amx_pack_codebook(packed.values.const_data_ptr<float>(), packed.panels, D, codes.data());
  const float* pbias = packed.bias.const_data_ptr<float>();
  const float scale = kernels::vq_score_scale(metric);
  const int64_t num_blocks = (N + kAmxRowsPerBlock - 1) / kAmxRowsPerBlock;
  fourm_fast::parallel_for(0, num_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<char> scratch(vq_search_amx_scratch_bytes(kAmxRowsPerBlock, D) + 64);
    void* aligned = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
    std::vector<VqLaneBest16> best(static_cast<size_t>(kAmxRowsPerBlock));
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * kAmxRowsPerBlock, rows = std::min(kAmxRowsPerBlock, N - r0);
      for (int64_t i = 0; i < rows; ++i) {
        for (int l = 0; l < 16; ++l) {
          best[i].score[l] = kernels::positive_infinity_f32();
          best[i].index[l] = -1;
        }
      }
      vq_search_amx(reinterpret_cast<const uint16_t*>(x + r0 * xs0), xs0, rows, D, codes.data(), pbias, packed.panels,
                    scale, best.data(), aligned);
      for (int64_t i = 0; i < rows; ++i) {
        float bs = kernels::positive_infinity_f32();
        int64_t bi = -1;
        for (int l = 0; l < 16; ++l) {
          if (kernels::vq_better(best[i].score[l], best[i].index[l], bs, bi)) {
            bs = best[i].score[l];
            bi = best[i].index[l];
          }
        }
        kernels::vq_finalize_row(x + (r0 + i) * xs0, 1, cb, cs0, cs1, D, bi, metric, out_index + r0 + i,
                                 out_distance + r0 + i);
      }
    }
  });
  return true;
}
#endif

template <typename scalar_t>
void vq_lookup_cpu_impl(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                        int64_t* out_index, float* out_distance) {
  const int64_t N = x2.size(0), D = x2.size(1);
  const int64_t xs0 = x2.stride(0), xs1 = x2.stride(1);
  const int64_t cs0 = codebook.stride(0), cs1 = codebook.stride(1);
  const scalar_t* x = x2.const_data_ptr<scalar_t>();
  const scalar_t* cb = codebook.const_data_ptr<scalar_t>();

  const PackedCodebook packed = pack_codebook<scalar_t>(codebook, metric);
#ifdef FOURM_FAST_WITH_AMX
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_isa_allows_amx() && vq_lookup_amx(x2, codebook, packed, metric, out_index, out_distance)) return;
  }
#endif
  const float* pvalues = packed.values.const_data_ptr<float>();
  const float* pbias = packed.bias.const_data_ptr<float>();
  const float scale = kernels::vq_score_scale(metric);
  const PanelKernel kernel = select_kernel();

  const int64_t panels_per_block = std::max<int64_t>(1, std::min<int64_t>(32, kRowBlockFloats / (kMr * D)));
  const int64_t rows_per_block = panels_per_block * kMr;
  const int64_t num_blocks = (N + rows_per_block - 1) / rows_per_block;

  fourm_fast::parallel_for(0, num_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<float> apack(static_cast<size_t>(panels_per_block * D * kMr));
    std::vector<LaneBest> best(static_cast<size_t>(rows_per_block));
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * rows_per_block;
      const int64_t rows = std::min(rows_per_block, N - r0);
      const int64_t panels = (rows + kMr - 1) / kMr;
      // Pack rows as [panel][D][kMr] in fp32; rows past the end are zero and ignored below.
      for (int64_t p = 0; p < panels; ++p) {
        float* dst = apack.data() + p * D * kMr;
        for (int r = 0; r < kMr; ++r) {
          const int64_t row = r0 + p * kMr + r;
          if (row < N) {
            const scalar_t* src = x + row * xs0;
            for (int64_t d = 0; d < D; ++d) dst[d * kMr + r] = static_cast<float>(src[d * xs1]);
          } else {
            for (int64_t d = 0; d < D; ++d) dst[d * kMr + r] = 0.0f;
          }
        }
      }
      for (int64_t i = 0; i < panels * kMr; ++i) {
        for (int l = 0; l < kLanes; ++l) {
          best[i].score[l] = kernels::positive_infinity_f32();
          best[i].index[l] = -1;
        }
      }
      // Code panels outer, row panels inner: one packed code panel is reused from L1 by every row
      // panel of the block.
      for (int64_t cp = 0; cp < packed.panels; ++cp) {
        const float* bpanel = pvalues + cp * D * kNr;
        const float* bbias = pbias + cp * kNr;
        const int32_t base = static_cast<int32_t>(cp * kNr);
        for (int64_t p = 0; p < panels; ++p) {
          kernel(apack.data() + p * D * kMr, bpanel, bbias, D, scale, base, best.data() + p * kMr);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        float bs = kernels::positive_infinity_f32();
        int64_t bi = -1;
        for (int l = 0; l < kLanes; ++l) {
          if (kernels::vq_better(best[i].score[l], best[i].index[l], bs, bi)) {
            bs = best[i].score[l];
            bi = best[i].index[l];
          }
        }
        kernels::vq_finalize_row(x + row * xs0, xs1, cb, cs0, cs1, D, bi, metric, out_index + row,
                                 out_distance + row);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vq_lookup_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                 c10::string_view metric_name) {
  check_vq_inputs(x, codebook);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "vq_lookup (CPU): x must be a CPU tensor, got ", x.device());
  const VqMetric metric = parse_vq_metric(std::string_view(metric_name.data(), metric_name.size()));
  const int64_t D = codebook.size(1);
  auto [indices, distance] = vq_empty_outputs(x);
  if (indices.numel() == 0) return {indices, distance};
  const at::Tensor x2 = x.reshape({-1, D});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vq_lookup_cpu", [&] {
    vq_lookup_cpu_impl<scalar_t>(x2, codebook, metric, indices.data_ptr<int64_t>(),
                                 distance.data_ptr<float>());
  });
  return {indices, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CPU, m) { m.impl("vq_lookup", &vq_lookup_cpu); }

}  // namespace fourm_fast
