// Runs the masked_attention CUDA kernels (csrc/cuda/attention_kernels.cuh, compiled as host C++
// on cuda_emu.h) on small hostile cases and checks out, lse, dq, dk and dv against a float64
// reference of the op's rule. The launches mirror the host code of csrc/cuda/attention_cuda.cu
// (forward_mma / forward_simt, compute_delta, backward_mma / backward_simt): grid sizes, tile
// bounds at each kernel's granularity, dynamic smem sizes. Keep them in step with it.
//
// Modes (harness_main.h): fixed [COUNT], race (a few cases that walk several streamed tiles with
// each kernel: built with -fsanitize=thread, an smem access that no barrier orders is reported
// as a data race), random SEED COUNT.
//
// Outputs start as 0xFF bytes (NaN), operand columns past d_cols hold NaN (never to be read),
// and smem starts as NaN (cuda_emu.h): an element that is read before it is written, or never
// written, fails the comparison.
#include "cuda_emu.h"
#include "harness_main.h"

#include <limits>
#include <random>
#include <string>
#include <type_traits>

#include "cuda/attention_kernels.cuh"

using namespace fourm_fast;
using fourm_fast::attn_tiles::AttnMetaArgs;
using fourm_fast::kernels::AttnTileBounds;

namespace {

using emu::Bf16;
using emu::Fp16;

enum class Dtype { kFloat32, kFloat16, kBFloat16 };
// kContiguousSegments: three segments in order, the middle one bidirectional, the others causal
// (4M's decoder layout), random padding; kDecoder: the same without padding, and kCausal: one
// causal sequence without padding, so whole key tiles are valid and the rank proofs of the
// full-tile fast path are what decides.
enum class Meta { kRandom, kAllValid, kSegmentsEmptySample, kContiguousSegments, kTailPadding, kRanksOnly,
                  kDecoder, kCausal };
constexpr int kMetaKinds = 8;

struct Case {
  int B, H, Nq, Nk, D;
  Meta meta;
  Dtype dtype;
  int pad;  // extra elements per operand row past d_cols (row pitch d_cols + pad)
};

const char* dtype_name(Dtype d) {
  return d == Dtype::kFloat32 ? "f32" : (d == Dtype::kFloat16 ? "f16" : "bf16");
}

long ceil_div(long a, long b) { return (a + b - 1) / b; }

using harness::pick;
using harness::randn;

void fail(const Case& c, const std::string& what) {
  ++harness::failures;
  std::printf("  FAIL B%d H%d Nq%d Nk%d D%d meta%d %s pad%d: %s\n", c.B, c.H, c.Nq, c.Nk, c.D, static_cast<int>(c.meta),
              dtype_name(c.dtype), c.pad, what.c_str());
}

// |got - ref| <= tol * max(1, max |ref|) everywhere (NaN fails).
void compare(const Case& c, const char* name, const std::vector<double>& ref, const std::vector<float>& got,
             double tol) {
  double scale = 1.0, worst = 0.0;
  long at = -1;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::isnan(got[i]) ? std::numeric_limits<double>::infinity() : std::fabs(got[i] - ref[i]);
    if (e > worst) {
      worst = e;
      at = static_cast<long>(i);
    }
  }
  if (worst > tol * scale) {
    char msg[200];
    std::snprintf(msg, sizeof msg, "%s: max error %.3g at %ld (ref %.5g, got %.5g), bound %.3g", name, worst, at,
                  ref[at], static_cast<double>(got[at]), tol * scale);
    fail(c, msg);
  }
}

std::vector<AttnTileBounds> tile_bounds(const AttnMetaArgs& m, long B, long N, int tile, bool keys) {
  const long tiles = ceil_div(N, tile);
  std::vector<AttnTileBounds> out(static_cast<size_t>(B * tiles));
  constexpr int kThreads = 128;
  emu::launch(ceil_div(B * tiles, kThreads), kThreads, 0,
              [&] { tile_bounds_kernel(m, B, N, tile, static_cast<int>(tiles), keys, out.data()); });
  return out;
}

template <class Kernel>
void launch(Kernel kernel, long blocks, int threads, size_t smem, const AttnArgs& a) {
  emu::launch(blocks, threads, smem, [&] { kernel(a); });
}

template <class F>
void dispatch_head_dim(int D, F&& f) {  // as attention_cuda.cu
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

struct Metadata {
  std::unique_ptr<bool[]> valid;
  std::vector<int32_t> qseg, kseg, qlim, krank;
  bool segments = false, ranks = false;
  AttnMetaArgs args() const {
    return {valid.get(), segments ? qseg.data() : nullptr, segments ? kseg.data() : nullptr,
            ranks ? qlim.data() : nullptr, ranks ? krank.data() : nullptr, segments, ranks};
  }
};

Metadata make_metadata(const Case& c) {
  const long B = c.B, Nq = c.Nq, Nk = c.Nk;
  Metadata m;
  m.valid.reset(new bool[B * Nk]);
  m.qseg.resize(B * Nq);
  m.kseg.resize(B * Nk);
  m.qlim.resize(B * Nq);
  m.krank.resize(B * Nk);
  const bool contiguous = c.meta == Meta::kContiguousSegments || c.meta == Meta::kDecoder;
  const bool causal = c.meta == Meta::kCausal;
  for (long b = 0; b < B; ++b) {
    for (long j = 0; j < Nk; ++j) {
      bool v = pick(5) != 0;
      if (c.meta == Meta::kAllValid || c.meta == Meta::kDecoder || causal) v = true;
      if (c.meta == Meta::kTailPadding) v = j < Nk - Nk / 5;
      m.valid[b * Nk + j] = v;
      m.kseg[b * Nk + j] = contiguous ? static_cast<int32_t>(j * 3 / Nk) : pick(3);
      m.krank[b * Nk + j] = static_cast<int32_t>(j);
    }
    for (long i = 0; i < Nq; ++i) {
      const int seg = static_cast<int>(i * 3 / Nq);
      m.qseg[b * Nq + i] = contiguous ? seg : pick(4);  // random segment 3 has no keys
      // contiguous: the middle segment bidirectional, the others causal-like
      m.qlim[b * Nq + i] = contiguous ? (seg == 1 ? static_cast<int32_t>(Nk) : static_cast<int32_t>(i * Nk / Nq))
                           : causal   ? static_cast<int32_t>(i * Nk / Nq)
                                      : pick(c.Nk + 2) - 1;
    }
  }
  m.segments = c.meta == Meta::kRandom || c.meta == Meta::kSegmentsEmptySample || contiguous;
  m.ranks = c.meta == Meta::kRandom || contiguous || c.meta == Meta::kRanksOnly || causal;
  if (c.meta == Meta::kSegmentsEmptySample && B > 1) {
    for (long j = 0; j < Nk; ++j) m.valid[(B - 1) * Nk + j] = false;
  }
  return m;
}

// A [B][H][N][pitch] operand: columns < D random, D..d_cols zero (a padded copy's layout), the
// rest NaN. `exact` receives the values as the kernels see them (after rounding to T).
template <class T>
std::vector<T> make_operand(const Case& c, long N, long d_cols, long pitch, std::vector<double>& exact) {
  const long rows = static_cast<long>(c.B) * c.H * N;
  std::vector<T> buf(static_cast<size_t>(rows * pitch));
  exact.assign(static_cast<size_t>(rows * c.D), 0.0);
  for (long r = 0; r < rows; ++r) {
    for (long d = 0; d < pitch; ++d) {
      const float f = d < c.D ? randn() : (d < d_cols ? 0.0f : std::numeric_limits<float>::quiet_NaN());
      T& x = buf[r * pitch + d];
      if constexpr (std::is_same_v<T, float>) {
        x = f;
      } else if constexpr (std::is_same_v<T, Bf16>) {
        x.bits = emu::float_to_bf16(f);
      } else {
        x.bits = emu::float_to_fp16(f);
      }
      if (d < c.D) exact[r * c.D + d] = static_cast<float>(x);
    }
  }
  return buf;
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
  std::vector<bool> key_seen;  // per (b, h, key): some query sees it
};

Reference reference(const Case& c, const Metadata& m, const std::vector<double>& q, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<double>& g, double scale) {
  const long B = c.B, H = c.H, Nq = c.Nq, Nk = c.Nk, D = c.D;
  Reference r;
  r.out.assign(B * H * Nq * D, 0.0);
  r.lse.assign(B * H * Nq, -std::numeric_limits<double>::infinity());
  r.dq.assign(B * H * Nq * D, 0.0);
  r.dk.assign(B * H * Nk * D, 0.0);
  r.dv.assign(B * H * Nk * D, 0.0);
  r.key_seen.assign(B * H * Nk, false);
  for (long b = 0; b < B; ++b) {
    for (long h = 0; h < H; ++h) {
      const long bh = b * H + h;
      for (long i = 0; i < Nq; ++i) {
        std::vector<double> s(Nk), p(Nk, 0.0);
        std::vector<bool> vis(Nk);
        double mx = -std::numeric_limits<double>::infinity();
        for (long j = 0; j < Nk; ++j) {
          vis[j] = kernels::attn_visible({m.qseg[b * Nq + i], m.qlim[b * Nq + i]},
                                         {m.valid[b * Nk + j], m.kseg[b * Nk + j], m.krank[b * Nk + j]}, m.segments,
                                         m.ranks);
          double t = 0.0;
          for (long d = 0; d < D; ++d) t += q[(bh * Nq + i) * D + d] * k[(bh * Nk + j) * D + d];
          s[j] = t * scale;
          if (vis[j]) mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (long j = 0; j < Nk; ++j) sum += vis[j] ? std::exp(s[j] - mx) : 0.0;
        if (sum == 0.0) continue;
        const double lse = mx + std::log(sum);
        r.lse[bh * Nq + i] = lse;
        for (long j = 0; j < Nk; ++j) {
          p[j] = vis[j] ? std::exp(s[j] - lse) : 0.0;
          if (vis[j]) r.key_seen[bh * Nk + j] = true;
        }
        double delta = 0.0;
        for (long d = 0; d < D; ++d) {
          double o = 0.0;
          for (long j = 0; j < Nk; ++j) o += p[j] * v[(bh * Nk + j) * D + d];
          r.out[(bh * Nq + i) * D + d] = o;
          delta += g[(bh * Nq + i) * D + d] * o;
        }
        for (long j = 0; j < Nk; ++j) {
          if (!vis[j]) continue;
          double dp = 0.0;
          for (long d = 0; d < D; ++d) dp += g[(bh * Nq + i) * D + d] * v[(bh * Nk + j) * D + d];
          const double ds = p[j] * (dp - delta);
          for (long d = 0; d < D; ++d) {
            r.dq[(bh * Nq + i) * D + d] += scale * ds * k[(bh * Nk + j) * D + d];
            r.dk[(bh * Nk + j) * D + d] += scale * ds * q[(bh * Nq + i) * D + d];
            r.dv[(bh * Nk + j) * D + d] += p[j] * g[(bh * Nq + i) * D + d];
          }
        }
      }
    }
  }
  return r;
}

template <class T>
std::vector<float> to_float(const std::vector<T>& x) {
  std::vector<float> f(x.size());
  for (size_t i = 0; i < x.size(); ++i) f[i] = static_cast<float>(x[i]);
  return f;
}

template <class T>
std::vector<T> nan_filled(size_t n) {
  std::vector<T> x(n);
  std::memset(static_cast<void*>(x.data()), 0xFF, n * sizeof(T));
  return x;
}

// Rows that see nothing and keys nobody sees: exactly zero, lse exactly -inf.
void check_empty_rows(const Case& c, const Reference& r, const std::vector<float>& out, const std::vector<float>& lse,
                      const std::vector<float>& dq, const std::vector<float>& dk, const std::vector<float>& dv) {
  const long D = c.D;
  for (size_t row = 0; row < r.lse.size(); ++row) {
    const bool empty = std::isinf(r.lse[row]);
    if (empty != std::isinf(lse[row]) || std::isnan(lse[row]) || (empty && lse[row] > 0)) {
      fail(c, "lse: -inf exactly where a query sees no key");
      return;
    }
    if (!empty) continue;
    for (long d = 0; d < D; ++d) {
      if (out[row * D + d] != 0.0f || dq[row * D + d] != 0.0f) {
        fail(c, "a query that sees no key must give exact zeros (out, dq)");
        return;
      }
    }
  }
  for (size_t key = 0; key < r.key_seen.size(); ++key) {
    if (r.key_seen[key]) continue;
    for (long d = 0; d < D; ++d) {
      if (dk[key * D + d] != 0.0f || dv[key * D + d] != 0.0f) {
        fail(c, "a key no query sees must get exact zero gradients (dk, dv)");
        return;
      }
    }
  }
}

template <class T>
void run_case(const Case& c) {
  constexpr bool kMma = !std::is_same_v<T, float>;
  constexpr bool kBf16 = std::is_same_v<T, Bf16>;
  const long B = c.B, H = c.H, Nq = c.Nq, Nk = c.Nk;
  const Metadata meta = make_metadata(c);
  const long d_cols = kMma ? ceil_div(c.D, 8) * 8 : c.D;
  const long pitch = d_cols + c.pad;
  std::vector<double> qx, kx, vx, gx;
  const std::vector<T> q = make_operand<T>(c, Nq, d_cols, pitch, qx), k = make_operand<T>(c, Nk, d_cols, pitch, kx),
                       v = make_operand<T>(c, Nk, d_cols, pitch, vx), g = make_operand<T>(c, Nq, d_cols, pitch, gx);
  const float scale = 1.3f / std::sqrt(static_cast<float>(c.D));  // not d^-1/2: a wrong default shows
  const Reference ref = reference(c, meta, qx, kx, vx, gx, scale);

  auto operand = [&](const std::vector<T>& x, long N) { return Operand{x.data(), H * N * pitch, N * pitch, pitch, 1}; };
  AttnArgs a{};
  a.meta = meta.args();
  a.H = H;
  a.Nq = Nq;
  a.Nk = Nk;
  a.D = c.D;
  a.slices = static_cast<int>(ceil_div(c.D, kSimtSlice));
  a.scale = scale;
  a.q = operand(q, Nq);
  a.k = operand(k, Nk);
  a.v = operand(v, Nk);
  a.d_cols = static_cast<int>(d_cols);
  std::vector<T> out = nan_filled<T>(B * H * Nq * c.D);
  std::vector<float> lse(B * H * Nq, std::numeric_limits<float>::quiet_NaN());
  a.out = out.data();
  a.lse_out = lse.data();
  const auto qb = tile_bounds(a.meta, B, Nq, kTile, false), kb = tile_bounds(a.meta, B, Nk, kTile, true);
  a.q_bounds = qb.data();
  a.k_bounds = kb.data();
  a.q_tiles = static_cast<int>(ceil_div(Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(Nk, kTile));
  if constexpr (kMma) {
    dispatch_head_dim(c.D, [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      launch(attn_fwd_mma_kernel<kBf16, kD>, B * H * a.q_tiles, kMmaThreads, MmaCfg<kD>::kFwdSmem, a);
    });
  } else {
    launch(attn_fwd_simt_kernel, B * H * a.q_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a);
  }

  // backward: delta over the kernel's own (rounded) output, then dq and dk/dv
  std::vector<float> delta(B * H * Nq, std::numeric_limits<float>::quiet_NaN());
  const long rows = B * H * Nq;
  const Operand o{out.data(), H * Nq * c.D, Nq * c.D, c.D, 1};
  const Operand dout = operand(g, Nq);
  emu::launch(ceil_div(rows, 8), 256, 0, [&] { delta_kernel<T>(o, dout, H, Nq, c.D, rows, delta.data()); });
  std::vector<T> dq = nan_filled<T>(B * H * Nq * c.D), dk = nan_filled<T>(B * H * Nk * c.D),
                 dv = nan_filled<T>(B * H * Nk * c.D);
  a.dout = dout;
  a.lse = lse.data();
  a.delta = delta.data();
  a.dq = dq.data();
  a.dk = dk.data();
  a.dv = dv.data();
  if constexpr (kMma) {
    dispatch_head_dim(c.D, [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      using Cfg = MmaCfg<kD>;
      const auto kb_dq = tile_bounds(a.meta, B, Nk, Cfg::kBk, true);
      AttnArgs dq_args = a;
      dq_args.k_bounds = kb_dq.data();
      dq_args.k_tiles = static_cast<int>(ceil_div(Nk, Cfg::kBk));
      launch(attn_bwd_dq_mma_kernel<kBf16, kD>, B * H * dq_args.q_tiles, kMmaThreads, Cfg::kDqSmem, dq_args);
      const auto qb_small = tile_bounds(a.meta, B, Nq, Cfg::kBq, false);
      AttnArgs kv_args = a;
      kv_args.q_bounds = qb_small.data();
      kv_args.q_tiles = static_cast<int>(ceil_div(Nq, Cfg::kBq));
      launch(attn_bwd_dkdv_mma_kernel<kBf16, kD>, B * H * a.k_tiles, kMmaThreads, Cfg::kDkdvSmem, kv_args);
    });
  } else {
    launch(attn_bwd_dq_simt_kernel, B * H * a.q_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a);
    launch(attn_bwd_dkdv_simt_kernel, B * H * a.k_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a);
  }

  // Tolerances relative to the largest reference value: fp32 accumulates in fp32; the tensor-core
  // path rounds P (and dS) to the input dtype before its second products, as flash attention does.
  const double out_tol = kMma ? (kBf16 ? 3e-2 : 4e-3) : 1e-5;
  const double grad_tol = kMma ? (kBf16 ? 5e-2 : 1e-2) : 1e-4;
  const auto outf = to_float(out), dqf = to_float(dq), dkf = to_float(dk), dvf = to_float(dv);
  compare(c, "out", ref.out, outf, out_tol);
  std::vector<double> lse_finite(ref.lse.size());
  std::vector<float> lse_got(lse.size());
  for (size_t i = 0; i < lse.size(); ++i) {  // values where finite; the -inf pattern is checked below
    lse_finite[i] = std::isinf(ref.lse[i]) ? 0.0 : ref.lse[i];
    lse_got[i] = std::isinf(ref.lse[i]) && std::isinf(lse[i]) ? 0.0f : lse[i];
  }
  compare(c, "lse", lse_finite, lse_got, 1e-5);
  compare(c, "dq", ref.dq, dqf, grad_tol);
  compare(c, "dk", ref.dk, dkf, grad_tol);
  compare(c, "dv", ref.dv, dvf, grad_tol);
  check_empty_rows(c, ref, outf, lse, dqf, dkf, dvf);
}

void run(const Case& c) {
  char label[120];
  std::snprintf(label, sizeof label, "B%d H%d Nq%d Nk%d D%d meta%d %s pad%d", c.B, c.H, c.Nq, c.Nk, c.D,
                static_cast<int>(c.meta), dtype_name(c.dtype), c.pad);
  harness::report(label, [&] {
    switch (c.dtype) {
      case Dtype::kFloat32: run_case<float>(c); break;
      case Dtype::kFloat16: run_case<Fp16>(c); break;
      case Dtype::kBFloat16: run_case<Bf16>(c); break;
    }
  });
}

// Every kernel and tier, partial tiles on both sides, the full-tile fast path (all valid, whole
// 64-row tiles), empty rows and samples, padded rows (pitch past d_cols) and d not a multiple of 8.
std::vector<Case> fixed_cases() {
  using D = Dtype;
  using M = Meta;
  return {
      {1, 1, 1, 1, 16, M::kRanksOnly, D::kFloat16, 0},
      {1, 1, 17, 17, 32, M::kRandom, D::kFloat16, 0},
      {2, 1, 70, 45, 64, M::kRandom, D::kFloat16, 8},
      {1, 1, 64, 64, 64, M::kAllValid, D::kBFloat16, 0},
      {1, 2, 130, 70, 128, M::kAllValid, D::kFloat16, 0},
      {1, 1, 70, 130, 128, M::kRandom, D::kBFloat16, 0},
      {2, 1, 70, 70, 20, M::kSegmentsEmptySample, D::kFloat16, 0},
      {1, 1, 130, 130, 40, M::kContiguousSegments, D::kBFloat16, 0},
      {1, 1, 130, 130, 72, M::kTailPadding, D::kBFloat16, 0},
      {2, 1, 70, 70, 128, M::kContiguousSegments, D::kBFloat16, 16},
      {1, 1, 33, 129, 100, M::kRandom, D::kFloat16, 0},
      {1, 1, 128, 128, 8, M::kTailPadding, D::kFloat16, 0},
      {1, 1, 17, 17, 32, M::kRandom, D::kFloat32, 0},
      {2, 1, 70, 45, 72, M::kRandom, D::kFloat32, 3},
      {1, 1, 70, 130, 160, M::kContiguousSegments, D::kFloat32, 0},
      {1, 1, 130, 64, 1, M::kAllValid, D::kFloat32, 0},
      {2, 1, 64, 64, 64, M::kSegmentsEmptySample, D::kFloat32, 0},
      {1, 1, 150, 150, 64, M::kCausal, D::kBFloat16, 0},
      {1, 1, 200, 200, 32, M::kDecoder, D::kFloat16, 0},
      {1, 1, 130, 130, 128, M::kCausal, D::kFloat16, 0},
      {1, 1, 150, 150, 48, M::kDecoder, D::kFloat32, 0},
  };
}

// Several tiles on the streamed side for every kernel (both pipeline stages reused), kept small:
// ThreadSanitizer runs them about ten times slower.
std::vector<Case> race_cases() {
  using D = Dtype;
  using M = Meta;
  return {
      {1, 1, 70, 150, 32, M::kRandom, D::kFloat16, 0},
      {1, 1, 130, 150, 64, M::kCausal, D::kBFloat16, 0},
      {1, 1, 70, 100, 128, M::kRandom, D::kBFloat16, 0},
      {1, 1, 70, 150, 72, M::kRandom, D::kFloat32, 0},
  };
}

std::vector<Case> random_cases(unsigned seed, int count) {
  std::mt19937 r(seed);
  const int ns[] = {1, 5, 31, 32, 33, 63, 64, 65, 96, 129, 150};
  const int ds[] = {1, 8, 15, 16, 24, 32, 33, 48, 56, 64, 65, 80, 96, 120, 128, 136, 200};
  std::vector<Case> cases;
  for (int t = 0; t < count; ++t) {
    Case c{1 + static_cast<int>(r() % 2), 1 + static_cast<int>(r() % 2), ns[r() % 11], ns[r() % 11], ds[r() % 17],
           static_cast<Meta>(r() % kMetaKinds), static_cast<Dtype>(r() % 3), static_cast<int>(r() % 3) * 8};
    if (c.dtype != Dtype::kFloat32 && c.D > 128) c.dtype = Dtype::kFloat32;  // the host runs SIMT on fp32 copies
    cases.push_back(c);
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  return harness::main<Case>(argc, argv, 1234, {fixed_cases(), race_cases(), random_cases}, run);
}
