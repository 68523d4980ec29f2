// Runs the sample_tokens CUDA kernel (csrc/cuda/sampling_kernels.cuh, compiled as host C++ on
// cuda_emu.h) and checks tokens, probs and status bit for bit against the CPU executor's row
// code (csrc/cpu/sampling_cpu_rows.h, torch-free, its portable copy), as the GPU tests do. The
// launch mirrors launch_sample in csrc/cuda/sampling_cuda.cu (512 threads, the smem row copy's
// size), run with both kernel variants (row in smem, row re-read from global memory) and with a
// grid of fewer blocks than rows, so blocks loop over rows as they do past 2^31 - 1 rows.
//
// Modes (harness_main.h): fixed [COUNT], race (a few cases for -fsanitize=thread).
#include "cuda_emu.h"
#include "harness_main.h"

#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/sampling_kernels.cuh"

#define FF_ROWS_NS oracle
#include "cpu/sampling_cpu_rows.h"

using namespace fourm_fast;
using emu::Bf16;
using emu::Fp16;

namespace {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// Sampling settings of a case: one value for every row, or (per_row) cycled over the rows.
struct Settings {
  std::vector<float> temperature, top_k, top_p, min_p, cfg_scale;
};

struct Case {
  int R, V;
  Dtype dtype;
  bool cfg;
  int settings;  // index into settings_list()
  int special;   // 0 none; 1 rows with NaN / +inf / all -inf logits and bad parameters
};

std::vector<Settings> settings_list() {
  return {
      {{1.0f}, {0.0f}, {1.0f}, {0.0f}, {1.0f}},                        // plain sampling
      {{0.7f}, {5.0f}, {0.9f}, {0.01f}, {3.0f}},                      // every filter, CFG 3
      {{0.0f}, {0.0f}, {1.0f}, {0.0f}, {2.0f}},                       // argmax
      {{2.0f}, {0.25f}, {0.5f}, {0.0f}, {1.5f}},                      // top-k as a fraction of V
      {{1.0f}, {0.0f}, {0.9f}, {0.0f}, {1.0f}},                       // T = 1 with top-p (4M's default)
      {{1.0f}, {5.0f}, {0.8f}, {0.0f}, {2.0f}},                       // T = 1, top-k and top-p
      {{1.0f, 0.0f, 0.5f, 1.3f}, {0.0f, 3.0f, 1.0f, 40.0f}, {1.0f, 0.8f, 0.3f, 1.0f},  // per row
       {0.0f, 0.0f, 0.2f, 0.05f}, {1.0f, 2.0f, 0.5f, 4.0f}},
  };
}

const char* dtype_name(Dtype d) { return d == Dtype::kFloat32 ? "f32" : (d == Dtype::kFloat16 ? "f16" : "bf16"); }

float randn() { return harness::randn(2.0f); }  // logits of a few units, as a model's

template <class T, bool kCfg, bool kSmem>
void run_variant(const Case& c, const std::vector<T>& cond, const std::vector<T>& uncond, const Settings& s,
                 long grid) {
  const long R = c.R;
  const int V = c.V;
  const bool per_row = s.temperature.size() > 1;
  // Parameter arrays as the op passes them: stride 0 for one value, 1 per row (cycled here).
  std::vector<float> cols[5];
  const std::vector<float>* src[5] = {&s.temperature, &s.top_k, &s.top_p, &s.min_p, &s.cfg_scale};
  for (int i = 0; i < 5; ++i) {
    for (long r = 0; r < (per_row ? R : 1); ++r) cols[i].push_back((*src[i])[r % src[i]->size()]);
  }
  if (c.special && per_row && R > 5) {  // one bad parameter of each kind (statuses 1-6)
    cols[0][3] = -1.0f;                                      // temperature
    cols[2][4] = std::numeric_limits<float>::quiet_NaN();    // top_p
    cols[1][5] = 2.5f;                                       // top_k neither a fraction nor whole
    if (R > 8) cols[3][8] = 1.5f;                            // min_p
    if (R > 9) cols[4][9] = std::numeric_limits<float>::infinity();  // cfg_scale
  }
  const int64_t seed = 1234, offset = 77;
  SampleArgs<T> a{};
  a.cond = cond.data();
  // uncond rows start one element past a multiple of V + 1, so cond and uncond sit at different
  // 16-byte offsets and the kernel takes its scalar load path (as for the two halves of one
  // [2B, V] tensor with odd B * V)
  a.uncond = kCfg ? uncond.data() + 1 : nullptr;
  a.cs0 = V;
  a.cs1 = 1;
  a.us0 = kCfg ? V + 1 : 0;
  a.us1 = kCfg ? 1 : 0;
  a.R = R;
  a.V = V;
  for (int i = 0; i < 5; ++i) {
    a.params.ptr[i] = cols[i].data();
    a.params.stride[i] = per_row ? 1 : 0;
  }
  a.seed = &seed;
  a.offset = &offset;
  std::vector<int64_t> tokens(R, 12345);
  std::vector<float> probs(R, -1.0f);
  std::vector<int32_t> status(R, 99);
  a.tokens = tokens.data();
  a.probs = probs.data();
  a.status = status.data();
  using S = store_t<T, kCfg>;
  const size_t row_bytes = kSmem ? ((static_cast<size_t>(V) + 16) * sizeof(S) + 15) / 16 * 16 : 0;
  emu::launch(grid, kThreads, row_bytes, [&] { sample_tokens_kernel<T, kCfg, kSmem>(a); });

  std::vector<kernels::SampleParams> params(per_row ? R : 1);
  for (size_t r = 0; r < params.size(); ++r) {
    params[r] = {cols[0][r], cols[1][r], cols[2][r], cols[3][r], cols[4][r]};
  }
  std::vector<int64_t> want_tokens(R);
  std::vector<float> want_probs(R);
  std::vector<int32_t> want_status(R);
  oracle::sample_rows<T>(cond.data(), V, 1, kCfg ? uncond.data() + 1 : nullptr, kCfg ? V + 1 : 0, kCfg ? 1 : 0, V,
                         params.data(), per_row ? 1 : 0, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), 0,
                         R, want_tokens.data(), want_probs.data(), want_status.data());
  for (long r = 0; r < R; ++r) {
    const bool same_prob = std::memcmp(&probs[r], &want_probs[r], 4) == 0 ||
                           (std::isnan(probs[r]) && std::isnan(want_probs[r]));
    if (tokens[r] != want_tokens[r] || !same_prob || status[r] != want_status[r]) {
      ++harness::failures;
      std::printf("  FAIL R%d V%d %s cfg%d settings%d special%d %s grid%ld: row %ld got (%lld, %a, %d), CPU (%lld, %a, %d)\n",
                  c.R, c.V, dtype_name(c.dtype), c.cfg, c.settings, c.special, kSmem ? "smem" : "global", grid, r,
                  static_cast<long long>(tokens[r]), probs[r], status[r], static_cast<long long>(want_tokens[r]),
                  want_probs[r], want_status[r]);
      return;
    }
  }
}

template <class T>
void run_case(const Case& c) {
  const long R = c.R;
  const int V = c.V;
  std::vector<T> cond(R * V), uncond(R * (V + 1) + 1);
  for (auto& v : cond) v = T(randn());
  for (auto& v : uncond) v = T(randn());
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  if (c.special && R > 2) {
    cond[0 * V + V / 2] = T(nan);     // row 0: NaN -> error status
    cond[1 * V + V / 3] = T(inf);     // row 1: +inf -> error status
    for (int t = 0; t < V; ++t) cond[2 * V + t] = T(-inf);  // row 2: nothing to sample
    if (R > 6) cond[6 * V + V - 1] = T(40.0f);  // row 6: one dominant logit at the end
    if (R > 7 && V > 8) {  // row 7: 3 finite logits, so a top-k of 5..V-1 keeps them all
      for (int t = 3; t < V; ++t) cond[7 * V + t] = T(-inf);
    }
  }
  const Settings s = settings_list()[c.settings];
  for (long grid : {R, std::max<long>(1, R / 3)}) {
    if (c.cfg) {
      run_variant<T, true, true>(c, cond, uncond, s, grid);
      run_variant<T, true, false>(c, cond, uncond, s, grid);
    } else {
      run_variant<T, false, true>(c, cond, uncond, s, grid);
      run_variant<T, false, false>(c, cond, uncond, s, grid);
    }
  }
}

void run(const Case& c) {
  char label[120];
  std::snprintf(label, sizeof label, "R%d V%d %s cfg%d settings%d special%d", c.R, c.V, dtype_name(c.dtype), c.cfg,
                c.settings, c.special);
  harness::report(label, [&] {
    switch (c.dtype) {
      case Dtype::kFloat32: run_case<float>(c); break;
      case Dtype::kFloat16: run_case<Fp16>(c); break;
      case Dtype::kBFloat16: run_case<Bf16>(c); break;
    }
  });
}

// V of 1, odd, below and above a block's 512 threads and its 16-byte vectors, and one large
// enough that the draw re-walks several steps per chunk; every dtype, CFG (uncond at another
// alignment than cond), all filters, argmax, T = 1 with top-p, per-row settings with a bad
// parameter of each kind, NaN / +inf / all -inf rows, top-k above a row's finite logits.
std::vector<Case> fixed_cases() {
  using D = Dtype;
  return {
      {3, 1, D::kFloat32, false, 0, 0},    {4, 97, D::kFloat32, false, 1, 0},  {8, 1031, D::kFloat32, true, 1, 1},
      {5, 3000, D::kBFloat16, false, 0, 0}, {8, 1031, D::kBFloat16, true, 4, 1}, {4, 517, D::kFloat16, false, 3, 0},
      {7, 2048, D::kFloat16, true, 2, 1},   {9, 4099, D::kFloat32, false, 4, 1}, {6, 33, D::kBFloat16, false, 1, 0},
      {4, 1500, D::kFloat32, false, 5, 0},  {10, 997, D::kBFloat16, true, 4, 1}, {3, 3001, D::kFloat16, true, 6, 0},
      {2, 40000, D::kFloat32, false, 5, 0},  // the draw's chunks span several steps
  };
}

std::vector<Case> race_cases() {
  using D = Dtype;
  return {{3, 1031, D::kFloat32, true, 1, 0}, {10, 700, D::kBFloat16, false, 4, 1}};
}

}  // namespace

int main(int argc, char** argv) {
  return harness::main<Case>(argc, argv, 7, {fixed_cases(), race_cases(), {}}, run);
}
