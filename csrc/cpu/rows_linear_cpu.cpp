// CPU executor of rows_linear: x (R x K) times weight (N x K) transposed, for the few rows of one
// autoregressive decoding step.
//
// Such a product is bound by streaming the weight from memory (R multiply-adds per weight float),
// and BLAS libraries run it unevenly: MKL's F.linear read the 30522 x 384 head cold at 14.2 GB/s
// for 4 rows on the 2-core Xeon, against 23.8 GB/s for a plain sum (bench/bench_linear_rows.py;
// fourm_fast/nn/few_rows.py has the table and the EPYC's story). Here each thread takes a
// contiguous block of weight rows, prefetches ahead of the multiply-adds, reads each row from
// memory once and multiplies it with every row of x, which stays in L1/L2: 18.3 GB/s there.
// Each output is one dot product in the fixed lane order of csrc/kernels/rows_linear_math.h, so
// results do not depend on the thread count, and the AVX2 kernel returns the portable loop's bits.
// bfloat16 / float16 weights are widened in registers as they stream (half the bytes of float32);
// x is widened once up front, the sums are float32 and rounded once to the inputs' dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FF_HAVE_X86 1
#endif

#include "../kernels/rows_linear_math.h"
#include "../rows_linear_checks.h"
#include "cpu_isa.h"
#include "parallel.h"

namespace fourm_fast {
namespace {

// Weight rows n0..n1 against all R rows of x; y is R x N row-major.
template <class W>
void rows_block_generic(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t R,
                        int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t r = 0; r < R; ++r) y[r * N + n] = kernels::rows_linear_dot(x + r * ldx, w + n * ldw, K);
  }
}

#ifdef FF_HAVE_X86
// The 8 lanes of acc combined in rows_linear_combine's order.
__attribute__((target("avx2,fma"))) inline float combine_avx2(__m256 acc) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));  // l0+l4 .. l3+l7
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));  // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2,fma"))) inline __m256i tail_mask(int64_t rem) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), idx);
}

// The last K % 8 floats of an x row; the lanes past K read -0 (and the weight's read +0), so their
// fma adds -0, which leaves every lane as the portable loop leaves it, -0 included (+0 would turn
// a lane of underflowed products from -0 into +0).
__attribute__((target("avx2,fma"))) inline __m256 x_tail(const float* p, __m256i mask) {
  return _mm256_blendv_ps(_mm256_set1_ps(-0.0f), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
}

// Eight weights as floats: a plain load, or 16-bit values widened exactly (bfloat16 is the high
// half of a float32; float16 through F16C).
__attribute__((target("avx2,fma"))) inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }

__attribute__((target("avx2,fma"))) inline __m256 load_w8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load_w8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The last K % 8 weights of a row; the lanes past K read +0.
__attribute__((target("avx2,fma"))) inline __m256 load_w_tail(const float* p, int64_t, __m256i mask) {
  return _mm256_maskload_ps(p, mask);
}

template <class W>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load_w_tail(const W* p, int64_t rem, __m256i) {
  W part[8] = {};  // value-initialised: +0 in both 16-bit formats
  for (int64_t i = 0; i < rem; ++i) part[i] = p[i];
  return load_w8(part);
}

// An NX x NW tile: NX rows of x against NW weight rows, NX * NW independent accumulators (a single
// chain of fused multiply-adds waits on its own latency; eight or more keep both FMA units busy).
// Each weight vector loaded is used NX times and each x vector NW times.
template <int NX, int NW, class W>
__attribute__((target("avx2,fma,f16c"))) inline void tile_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                                                int64_t K, __m256i mask, float* y, int64_t ldy) {
  __m256 acc[NX][NW];
#pragma GCC unroll 8
  for (int i = 0; i < NX; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NW];
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) wv[j] = load_w8(w + j * ldw + k);
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (K8 < K) {
    __m256 wv[NW];
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) wv[j] = load_w_tail(w + j * ldw + K8, K - K8, mask);
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) {
      const __m256 xv = x_tail(x + i * ldx + K8, mask);
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NX; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) y[i * ldy + j] = combine_avx2(acc[i][j]);
  }
}

// All rows of x against NW weight rows (a 6 x 2 tile holds 12 accumulators, 2 weight vectors and
// 1 x vector: 15 of the 16 AVX2 registers).
template <int NW, class W>
__attribute__((target("avx2,fma,f16c"))) inline void column_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                                                  float* y, int64_t R, int64_t N, int64_t K,
                                                                  __m256i mask) {
  int64_t r = 0;
  for (; r + 6 <= R; r += 6) tile_avx2<6, NW>(x + r * ldx, ldx, w, ldw, K, mask, y + r * N, N);
  for (; r + 4 <= R; r += 4) tile_avx2<4, NW>(x + r * ldx, ldx, w, ldw, K, mask, y + r * N, N);
  for (; r + 2 <= R; r += 2) tile_avx2<2, NW>(x + r * ldx, ldx, w, ldw, K, mask, y + r * N, N);
  for (; r < R; ++r) tile_avx2<1, NW>(x + r * ldx, ldx, w, ldw, K, mask, y + r * N, N);
}

// Prefetch distance in weight rows: of 4 and 16 tried on the Xeon, 16 (24 KiB at K = 384) read faster.
constexpr int64_t kPrefetchRows = 16;

template <class W>
__attribute__((target("avx2,fma,f16c"))) void rows_block_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                                               float* y, int64_t R, int64_t N, int64_t K, int64_t n0,
                                                               int64_t n1) {
  const __m256i mask = tail_mask(K % 8);
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(W));
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    // A core keeps few misses in flight by itself once multiply-adds sit between the loads:
    // without this, 4 rows of the head read at 15 GB/s, with it 19 (a smaller-pool run than the
    // table's 18.3).
    if (n + kPrefetchRows + 2 <= n1) {
      for (int j = 0; j < 2; ++j) {
        const char* ahead = reinterpret_cast<const char*>(w + (n + kPrefetchRows + j) * ldw);
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      }
    }
    column_avx2<2>(x, ldx, w + n * ldw, ldw, y + n, R, N, K, mask);
  }
  if (n < n1) column_avx2<1>(x, ldx, w + n * ldw, ldw, y + n, R, N, K, mask);
}
#endif

// y = x w^T for weight rows split over threads. For 16-bit weights the float32 sums go to yf and
// each task rounds its own columns into y16 (the inputs' dtype), cache-warm; for float32, yf is y.
template <class W>
void rows_linear_run(const float* xp, int64_t ldx, const W* wp, int64_t ldw, float* yf, W* y16, int64_t R,
                     int64_t N, int64_t K) {
  // At least 64 KiB of float32 weight (32 KiB of 16-bit) per task: small layers do not pay for
  // waking a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
#ifdef FF_HAVE_X86
  // F16C comes with every AVX2 CPU fourm_fast targets; the float16 path checks it all the same.
  const bool avx2 = cpu_isa_allows_avx2() && (!std::is_same_v<W, c10::Half> || __builtin_cpu_supports("f16c"));
#else
  const bool avx2 = false;
#endif
  fourm_fast::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#ifdef FF_HAVE_X86
    if (avx2) {
      rows_block_avx2(xp, ldx, wp, ldw, yf, R, N, K, n0, n1);
    } else
#endif
    {
      rows_block_generic(xp, ldx, wp, ldw, yf, R, N, K, n0, n1);
    }
    if constexpr (!std::is_same_v<W, float>) {
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t n = n0; n < n1; ++n) y16[r * N + n] = static_cast<W>(yf[r * N + n]);  // round to nearest even
      }
    }
  });
}

at::Tensor rows_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  check_rows_linear_inputs(x_in, weight_in);
  // Unit stride along K is all the kernels need; a weight of another layout is copied once.
  const at::Tensor w = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const int64_t R = x_in.size(0), K = x_in.size(1), N = w.size(0);
  at::Tensor y = at::empty({R, N}, x_in.options());
  if (R == 0 || N == 0) return y;
  const int64_t ldw = N > 1 ? w.stride(0) : K;
  if (x_in.scalar_type() == at::kFloat) {
    const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
    const int64_t ldx = R > 1 ? x.stride(0) : K;
    rows_linear_run(x.const_data_ptr<float>(), ldx, w.const_data_ptr<float>(), ldw, y.data_ptr<float>(),
                    static_cast<float*>(nullptr), R, N, K);
    return y;
  }
  // 16-bit: x widened here (R x K values, small next to the weight) and the float32 sums kept in
  // scratch, without an ATen op for either (a decoding step makes ~40 of these calls).
  std::vector<float> xf(static_cast<size_t>(R * K)), yf(static_cast<size_t>(R * N));
  auto run = [&](auto tag) {
    using W = decltype(tag);
    const W* xp = x_in.const_data_ptr<W>();
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t k = 0; k < K; ++k) xf[r * K + k] = static_cast<float>(xp[r * x_in.stride(0) + k * x_in.stride(1)]);
    }
    rows_linear_run(xf.data(), K, w.const_data_ptr<W>(), ldw, yf.data(), y.data_ptr<W>(), R, N, K);
  };
  if (x_in.scalar_type() == at::kBFloat16) {
    run(c10::BFloat16());
  } else {
    run(c10::Half());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CPU, m) { m.impl("rows_linear", &rows_linear_cpu); }

}  // namespace fourm_fast
