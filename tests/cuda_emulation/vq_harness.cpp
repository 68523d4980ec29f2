// Runs the vq_lookup CUDA kernels (csrc/cuda/vq_kernels.cuh, compiled as host C++ on cuda_emu.h)
// on small hostile cases: prepare, both tensor-core search variants (x resident in smem and x
// streamed) or the SIMT search, finalize. The launches mirror the host code of
// csrc/cuda/vq_cuda.cu (plan_search, prepare_codes, mma_row_operand, search_tensor_cores /
// search_simt, the finalize launch) except the code split, which is forced to one tile per split
// here so that every case has several (the GPU picks it from its SM count). Keep them in step.
//
// Modes (harness_main.h): fixed [COUNT], race (a few multi-tile cases for -fsanitize=thread).
//
// Checks per row, against float64: a finite row gets a finite code whose score (on the prepared,
// dtype-rounded codes) is within the dot product's rounding of the best score; its distance is
// vq_exact_distance of that code; a row with NaN/inf gets (-1, NaN); codes with a non-finite entry
// are never picked. The split candidates start NaN-filled, so a split that writes nothing fails.
#include "cuda_emu.h"
#include "harness_main.h"

#include <limits>
#include <random>
#include <string>
#include <type_traits>

#include "cuda/vq_kernels.cuh"

using namespace fourm_fast;
using emu::Bf16;
using emu::Fp16;
using kernels::VqMetric;

namespace {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct Case {
  int N, K, D;
  VqMetric metric;
  Dtype dtype;
  bool poison;  // a NaN row, an inf row, a code with NaN
};

const char* dtype_name(Dtype d) { return d == Dtype::kFloat32 ? "f32" : (d == Dtype::kFloat16 ? "f16" : "bf16"); }

using harness::randn;

void fail(const Case& c, const std::string& what) {
  ++harness::failures;
  std::printf("  FAIL N%d K%d D%d %s %s%s: %s\n", c.N, c.K, c.D, c.metric == VqMetric::L2 ? "l2" : "cosine",
              dtype_name(c.dtype), c.poison ? " poison" : "", what.c_str());
}

template <class T>
std::vector<T> random_matrix(long rows, long D) {
  std::vector<T> m(static_cast<size_t>(rows * D));
  for (auto& v : m) v = T(randn());
  return m;
}

struct Search {
  std::vector<float> part_score;
  std::vector<int32_t> part_index;
  int splits;
};

// plan_search, with the split forced to one code tile.
VqSearchArgs plan(long n, long D, long K, int chunk, VqMetric metric) {
  VqSearchArgs a{};
  a.n = n;
  a.d_pad = round_up(D, chunk);
  a.num_chunks = static_cast<int>(a.d_pad / chunk);
  a.num_tiles = static_cast<int>(round_up(K, kTileCodes) / kTileCodes);
  a.scale = kernels::vq_score_scale(metric);
  a.tiles_per_split = 1;
  return a;
}

template <class T, class Out, int kChunk, bool kDimMajor>
void prepare(const std::vector<T>& codebook, long K, long D, VqMetric metric, const VqSearchArgs& a,
             std::vector<Out>& prepared, std::vector<float>& bias) {
  const long k_pad = static_cast<long>(a.num_tiles) * kTileCodes;
  prepared.assign(static_cast<size_t>(k_pad * a.d_pad), Out(std::numeric_limits<float>::quiet_NaN()));
  bias.assign(static_cast<size_t>(k_pad), std::numeric_limits<float>::quiet_NaN());
  emu::launch((k_pad + 255) / 256, 256, 0, [&] {
    vq_prepare_codes_kernel<T, Out, kChunk, kDimMajor>(codebook.data(), D, 1, K, D, k_pad, a.d_pad, metric,
                                                       prepared.data(), bias.data());
  });
}

Search attach(VqSearchArgs& a) {
  Search s;
  s.splits = (a.num_tiles + a.tiles_per_split - 1) / a.tiles_per_split;
  s.part_score.assign(static_cast<size_t>(s.splits * a.n), std::numeric_limits<float>::quiet_NaN());
  s.part_index.assign(static_cast<size_t>(s.splits * a.n), 0x7f7f7f7f);
  a.part_score = s.part_score.data();
  a.part_index = s.part_index.data();
  return s;
}

// The search of one case: SIMT for float32, tensor cores (kResidentX picks the x layout) else.
template <class T, bool kResidentX>
Search search(const std::vector<T>& x, const std::vector<T>& codebook, const Case& c, std::vector<float>& bias_out,
              std::vector<float>& prepared_f) {
  const long n = c.N, D = c.D, K = c.K;
  if constexpr (std::is_same_v<T, float>) {
    VqSearchArgs a = plan(n, D, K, kSimtChunk, c.metric);
    std::vector<float> prepared;
    prepare<float, float, kSimtChunk, true>(codebook, K, D, c.metric, a, prepared, bias_out);
    const long n_pad = round_up(n, kTileRows);
    std::vector<float> xt(static_cast<size_t>(a.d_pad * n_pad), 0.0f);  // x^T, zero-padded
    for (long r = 0; r < n; ++r) {
      for (long d = 0; d < D; ++d) xt[d * n_pad + r] = x[r * D + d];
    }
    a.x = xt.data();
    a.x_ld = n_pad;
    a.codes = prepared.data();
    a.bias = bias_out.data();
    Search s = attach(a);
    emu::launch((n + kTileRows - 1) / kTileRows, s.splits, kThreads, kSimtSmemBytes, [&] { vq_search_simt_kernel(a); });
    prepared_f.resize(static_cast<size_t>(K * D));
    for (long j = 0; j < K; ++j) {
      for (long d = 0; d < D; ++d) prepared_f[j * D + d] = prepared[tiled_code_offset<kSimtChunk, true>(j, d, a.num_chunks)];
    }
    return s;
  } else {
    constexpr bool kBf16 = std::is_same_v<T, Bf16>;
    VqSearchArgs a = plan(n, D, K, kMmaChunk, c.metric);
    std::vector<T> prepared;
    prepare<T, T, kMmaChunk, false>(codebook, K, D, c.metric, a, prepared, bias_out);
    const long x_ld = round_up(D, 8);  // mma_row_operand's zero-padded copy (D % 8 != 0 here too)
    std::vector<T> rows(static_cast<size_t>(n * x_ld), T(0.0f));
    for (long r = 0; r < n; ++r) {
      for (long d = 0; d < D; ++d) rows[r * x_ld + d] = x[r * D + d];
    }
    a.x = rows.data();
    a.x_ld = x_ld;
    a.codes = prepared.data();
    a.bias = bias_out.data();
    Search s = attach(a);
    const size_t smem = kResidentX ? kTileRows * (a.d_pad + 8) * 2 + kStages * kMmaCodeStageBytes
                                   : kStages * (kMmaTileBytes + kMmaCodeStageBytes);
    emu::launch((n + kTileRows - 1) / kTileRows, s.splits, kThreads, smem,
                [&] { vq_search_mma_kernel<kBf16, kResidentX>(a); });
    prepared_f.resize(static_cast<size_t>(K * D));
    for (long j = 0; j < K; ++j) {
      for (long d = 0; d < D; ++d) {
        prepared_f[j * D + d] = static_cast<float>(prepared[tiled_code_offset<kMmaChunk, false>(j, d, a.num_chunks)]);
      }
    }
    return s;
  }
}

template <class T, bool kResidentX>
void run_case(const Case& c) {
  const long n = c.N, D = c.D, K = c.K;
  std::vector<T> x = random_matrix<T>(n, D), codebook = random_matrix<T>(K, D);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  if (c.poison) {
    x[0 * D + D / 2] = T(nan);
    if (n > 2) x[2 * D] = T(-inf);
    if (K > 1) codebook[1 * D + D - 1] = T(nan);
  }
  std::vector<float> bias, prepared;
  const Search s = search<T, kResidentX>(x, codebook, c, bias, prepared);
  std::vector<int64_t> index(static_cast<size_t>(n), 12345);
  std::vector<float> distance(static_cast<size_t>(n), -1.0f);
  emu::launch((n + 255) / 256, 256, 0, [&] {
    vq_finalize_kernel<T>(x.data(), D, 1, codebook.data(), D, 1, s.part_score.data(), s.part_index.data(), s.splits,
                          n, D, c.metric, index.data(), distance.data());
  });

  const double u = std::is_same_v<T, float> ? 0x1p-23 : (std::is_same_v<T, Bf16> ? 0x1p-7 : 0x1p-10);
  const double scale = kernels::vq_score_scale(c.metric);
  for (long r = 0; r < n; ++r) {
    bool finite_row = true;
    for (long d = 0; d < D; ++d) finite_row = finite_row && std::isfinite(static_cast<float>(x[r * D + d]));
    if (!finite_row) {
      if (index[r] != -1 || !std::isnan(distance[r])) fail(c, "a row with NaN/inf must give (-1, NaN)");
      continue;
    }
    // Scores of every finite code on the prepared codes, in float64, and a bound on the rounding
    // of the kernel's dot products: D * u * sum |x_d c'_d| (u: unit roundoff of the products'
    // inputs for the tensor cores, float32 accumulation for SIMT), doubled for slack.
    double best = std::numeric_limits<double>::infinity(), bound = 0.0;
    std::vector<double> score(static_cast<size_t>(K), std::numeric_limits<double>::infinity());
    for (long j = 0; j < K; ++j) {
      if (!std::isfinite(bias[j])) continue;
      double dot = 0.0, mag = 0.0;
      for (long d = 0; d < D; ++d) {
        const double xv = static_cast<float>(x[r * D + d]), cv = prepared[j * D + d];
        dot += xv * cv;
        mag += std::fabs(xv * cv);
      }
      score[j] = bias[j] + scale * dot;
      best = std::min(best, score[j]);
      bound = std::max(bound, 2.0 * (D + 2) * u * (mag + std::fabs(bias[j])) * std::fabs(scale));
    }
    const int64_t got = index[r];
    if (got < 0 || got >= K || !std::isfinite(score[got])) {
      fail(c, "row " + std::to_string(r) + ": index " + std::to_string(got) + " is not a finite code");
      continue;
    }
    if (score[got] > best + bound) {
      fail(c, "row " + std::to_string(r) + ": code " + std::to_string(got) + " scores " + std::to_string(score[got]) +
                  ", the best " + std::to_string(best) + " (bound " + std::to_string(bound) + ")");
      continue;
    }
    const float want = kernels::vq_exact_distance(
        D, [&](int64_t d) { return static_cast<float>(x[r * D + d]); },
        [&](int64_t d) { return static_cast<float>(codebook[got * D + d]); }, c.metric);
    if (!(distance[r] == want)) fail(c, "row " + std::to_string(r) + ": distance is not vq_exact_distance of its code");
  }
}

void run(const Case& c) {
  char label[120];
  std::snprintf(label, sizeof label, "N%d K%d D%d %s %s%s", c.N, c.K, c.D, c.metric == VqMetric::L2 ? "l2" : "cosine",
                dtype_name(c.dtype), c.poison ? " poison" : "");
  harness::report(label, [&] {
    switch (c.dtype) {
      case Dtype::kFloat32: run_case<float, false>(c); break;
      case Dtype::kFloat16:
        run_case<Fp16, true>(c);
        run_case<Fp16, false>(c);
        break;
      case Dtype::kBFloat16:
        run_case<Bf16, true>(c);
        run_case<Bf16, false>(c);
        break;
    }
  });
}

// Partial row and code tiles, D below, at and past a chunk (16 / 32) and not a multiple of 8,
// several code splits, poisoned rows and codes, both metrics and every dtype.
std::vector<Case> fixed_cases() {
  using D = Dtype;
  const VqMetric l2 = VqMetric::L2, cos = VqMetric::Cosine;
  return {
      {1, 1, 1, l2, D::kFloat32, false},   {5, 7, 3, cos, D::kFloat32, true},    {130, 300, 33, l2, D::kFloat32, true},
      {67, 129, 16, cos, D::kFloat32, false}, {1, 1, 8, l2, D::kFloat16, false}, {19, 7, 3, l2, D::kBFloat16, true},
      {130, 300, 33, cos, D::kFloat16, true}, {67, 129, 64, l2, D::kBFloat16, false},
      {129, 200, 100, cos, D::kBFloat16, false},
  };
}

std::vector<Case> race_cases() {
  using D = Dtype;
  return {{130, 300, 40, VqMetric::L2, D::kFloat16, false}, {70, 260, 20, VqMetric::Cosine, D::kFloat32, false}};
}

}  // namespace

int main(int argc, char** argv) {
  return harness::main<Case>(argc, argv, 99, {fixed_cases(), race_cases(), {}}, run);
}
