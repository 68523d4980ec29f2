// The sample_tokens CUDA kernel (device code only; the design is described at the top of
// sampling_cuda.cu, which includes this file and launches it). Kept apart from the host code so
// tests/cuda_emulation/ can compile this exact kernel as host C++ and run it without a GPU.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../kernels/sampling_math.h"
#include "ptx.cuh"

namespace fourm_fast {
namespace {  // included by one translation unit of the extension (sampling_cuda.cu)


using kernels::SampleParams;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBuckets = 2048;  // widest radix digit (11 bits)
constexpr int kMaxChunks = 16;     // draw: recorded partial sums per warp range

static_assert(kMaxBuckets % kThreads == 0 && (kMaxBuckets / 2) % kThreads == 0,
              "every thread owns a whole number of buckets in each digit's scan");
static_assert(kWarps <= 32 && kMaxChunks <= 32, "warp and chunk totals are scanned by one warp");

// Radix digits of the 32-bit ordered key, most significant first: bits 31..21, 20..10, 9..0.
__device__ __forceinline__ int digit_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ int digit_buckets(int pass) { return pass == 2 ? 1024 : 2048; }

struct ParamPtrs {
  const float* ptr[5];  // temperature, top_k, top_p, min_p, cfg_scale
  int64_t stride[5];    // 0 for a 0-d tensor
};

template <typename scalar_t>
struct SampleArgs {
  const scalar_t* cond;
  const scalar_t* uncond;  // nullptr without CFG
  int64_t cs0, cs1, us0, us1;
  int64_t R;
  int V;
  ParamPtrs params;
  const int64_t* seed;
  const int64_t* offset;
  int64_t* tokens;
  float* probs;
  int32_t* status;
};

struct SampleSmem {
  // Top-p digit histogram: the uint64 weight per bucket as two uint32 halves, because a 64-bit
  // shared atomicAdd is a compare-and-swap loop on sm_80/sm_90 (a disaster on a contended bucket)
  // while 32-bit ones are native. See add_mass().
  unsigned int mass_lo[kMaxBuckets];
  unsigned int mass_hi[kMaxBuckets];
  unsigned int count[kMaxBuckets];  // digit histogram: keys per bucket
  // One buffer per kind of block reduction, so consecutive reductions never share a buffer and
  // need no extra barrier between them (see the barrier notes in the kernel).
  unsigned long long scan_u[kWarps];
  unsigned long long pair_u[kWarps];
  unsigned long long draw_u[kWarps];
  unsigned long long chunk_u[kWarps][kMaxChunks];  // the draw's per-chunk warp totals
  int pair_i[kWarps];
  int argmax_i[kWarps];
  float load_max[kWarps];
  int load_flags[kWarps];
  unsigned long long draw_total, draw_target, draw_before;
  int draw_warp;
};

// ---------------------------------------------------------------------------------------------
// Element conversions. static_cast<float> of c10::BFloat16 / c10::Half is exact, as on the CPU.

template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return static_cast<float>(T(static_cast<unsigned short>(bits & 0xffffu), T::from_bits()));
}

// 16 bytes of T -> 16 / sizeof(T) floats, in memory order.
template <typename T>
__device__ __forceinline__ void decode16(const uint4& raw, float (&out)[16 / sizeof(T)]) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else {
    static_assert(sizeof(T) == 2, "16-bit types only");
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = half_bits_to_float<T>(w[j]);
      out[2 * j + 1] = half_bits_to_float<T>(w[j] >> 16);
    }
  }
}

// What the smem copy of a row holds: the raw logits without CFG, the guided floats with it.
template <typename scalar_t, bool kCfg>
using store_t = std::conditional_t<kCfg, float, scalar_t>;

// ---------------------------------------------------------------------------------------------
// Row views: every pass after the load reads the row through load(k, g), which yields the guided
// logits of tokens [k * kVec - pad, (k + 1) * kVec - pad). Tokens outside [0, V) read as -inf,
// which every pass ignores by construction (not finite, never kept, never the max), so no pass
// needs its own bounds logic.

template <typename scalar_t, bool kCfg>
struct SmemRowView {
  using S = store_t<scalar_t, kCfg>;
  static constexpr int kVec = 16 / sizeof(S);
  const unsigned char* base;  // 16-byte aligned; token t is element pad + t
  int V, pad, nvec;

  __device__ __forceinline__ void load(int k, float (&g)[kVec]) const {
    const uint4 raw = *reinterpret_cast<const uint4*>(base + static_cast<size_t>(k) * 16u);
    decode16<S>(raw, g);
    const int t0 = k * kVec - pad;
    if (t0 < 0 || t0 + kVec > V) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (t0 + i < 0 || t0 + i >= V) g[i] = -kernels::positive_infinity_f32();
      }
    }
  }
};

template <typename scalar_t, bool kCfg>
__device__ __forceinline__ float fetch_logit(const scalar_t* cond, const scalar_t* uncond, int64_t cs1,
                                             int64_t us1, float scale, int t) {
  const float c = static_cast<float>(cond[t * cs1]);
  if constexpr (kCfg) {
    return kernels::guided_logit(c, static_cast<float>(uncond[t * us1]), scale);
  } else {
    return c;
  }
}

template <typename scalar_t, bool kCfg>
struct GlobalRowView {
  static constexpr int kVec = 4;
  const scalar_t* cond;
  const scalar_t* uncond;
  int64_t cs1, us1;
  float scale;
  int V, pad, nvec;  // pad is always 0 here

  __device__ __forceinline__ void load(int k, float (&g)[kVec]) const {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int t = k * kVec + i;
      g[i] = t < V ? fetch_logit<scalar_t, kCfg>(cond, uncond, cs1, us1, scale, t)
                   : -kernels::positive_infinity_f32();
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Warp and block primitives. Integer sums and min/max are order-independent, so these may combine
// in any tree shape. The block ones end right after reading the per-warp buffer; the caller makes
// sure the next write of that buffer is separated by a later barrier.

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ uint64_t warp_inclusive_scan_u64(uint64_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t other = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += other;
  }
  return v;
}

__device__ __forceinline__ int warp_min_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Exclusive scan of v over the block in thread order; *total receives the block sum.
__device__ __forceinline__ uint64_t block_exclusive_scan_u64(uint64_t v, unsigned long long* buf,
                                                             uint64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint64_t incl = warp_inclusive_scan_u64(v, lane);
  if (lane == 31) buf[warp] = incl;
  __syncthreads();
  uint64_t before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const uint64_t x = buf[w];
    before += w < warp ? x : 0;
    sum += x;
  }
  *total = sum;
  return before + incl - v;
}

// Block-wide minimum of key (each key held by at most one thread, except INT_MAX = none), with the
// value carried by the thread that holds it.
__device__ __forceinline__ void block_min_pair(int& key, uint64_t& value, int* buf_i,
                                               unsigned long long* buf_u) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int k2 = __shfl_xor_sync(kFullMask, key, o);
    const uint64_t v2 = __shfl_xor_sync(kFullMask, value, o);
    if (k2 < key) {
      key = k2;
      value = v2;
    }
  }
  if (lane == 0) {
    buf_i[warp] = key;
    buf_u[warp] = value;
  }
  __syncthreads();
  key = INT_MAX;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int k2 = buf_i[w];
    if (k2 < key) {
      key = k2;
      value = buf_u[w];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Radix threshold selection (the GPU form of threshold_select, csrc/cpu/threshold_select.h).

struct RadixState {
  uint32_t prefix;  // digits chosen so far
  uint32_t mask;    // bits those digits cover
  uint64_t above;   // weight of the candidates above the current prefix range
};

// The top-p weight of a candidate: mass_weight(ff_exp(ff_sub(g, m)), bits); the comment on
// kernels::mass_weight (sampling_math.h) says why its integer form is the same value.
__device__ __forceinline__ uint64_t top_p_weight(float g, float m, int bits) {
  return kernels::mass_weight(kernels::ff_exp(kernels::ff_sub(g, m)), bits);
}

// Adds q to bucket d's uint64 mass with 32-bit atomics: the thread whose addition wraps the low
// word carries one into the high word, so hi * 2^32 + lo ends as the exact sum (every wrap is
// counted once, by the thread that caused it). Readers only look after a barrier.
__device__ __forceinline__ void add_mass(SampleSmem& sh, uint32_t d, uint64_t q) {
  const uint32_t lo = static_cast<uint32_t>(q);
  const uint32_t old = lo != 0u ? atomicAdd(&sh.mass_lo[d], lo) : 0u;
  const uint32_t hi = static_cast<uint32_t>(q >> 32) + (old + lo < old ? 1u : 0u);
  if (hi != 0u) atomicAdd(&sh.mass_hi[d], hi);
}

__device__ __forceinline__ uint64_t bucket_mass(const SampleSmem& sh, int d) {
  return (static_cast<uint64_t>(sh.mass_hi[d]) << 32) | sh.mass_lo[d];
}

// One digit's histogram over the candidates {g >= cut, g != -inf} (top-k passes cut = -inf, so
// every finite g) whose key matches the digits chosen so far. Order-free: shared atomics.
template <bool kWeighted, typename View>
__device__ __forceinline__ void histogram_pass(const View& view, SampleSmem& sh, float cut, float m, int bits,
                                               const RadixState& rs, int shift, uint32_t digit_mask) {
  for (int k = threadIdx.x; k < view.nvec; k += kThreads) {
    float g[View::kVec];
    view.load(k, g);
#pragma unroll
    for (int i = 0; i < View::kVec; ++i) {
      const float v = g[i];
      if (v >= cut && v != -kernels::positive_infinity_f32()) {
        const uint32_t key = kernels::ordered_key(v);
        if ((key & rs.mask) == rs.prefix) {
          const uint32_t d = (key >> shift) & digit_mask;
          atomicAdd(&sh.count[d], 1u);
          if constexpr (kWeighted) {
            const uint64_t q = top_p_weight(v, m, bits);
            if (q != 0) add_mass(sh, d, q);
          }
        }
      }
    }
  }
}

// Chooses one digit from a complete histogram of nb buckets, as the CPU loop does: walking down
// from the top bucket, the lowest non-empty bucket whose weight above still fits the budget.
// budget_fn(total, &budget) sees the histogram's total weight (top-k: the number of finite
// logits; top-p pass 0: Q) and returns false to stop without choosing (top-k with k >= n).
// Returns that verdict; block-uniform. Contains two barriers.
template <bool kWeighted, typename BudgetFn>
__device__ __forceinline__ bool select_digit(SampleSmem& sh, int nb, int shift, RadixState& rs,
                                             BudgetFn budget_fn) {
  const int bpt = nb / kThreads;                         // buckets per thread: 4 or 2
  const int dtop = nb - 1 - static_cast<int>(threadIdx.x) * bpt;  // this thread's highest bucket
  uint64_t local = 0;
  for (int j = 0; j < bpt; ++j) {
    const int d = dtop - j;
    local += kWeighted ? bucket_mass(sh, d) : static_cast<uint64_t>(sh.count[d]);
  }
  uint64_t total;
  const uint64_t excl = block_exclusive_scan_u64(local, sh.scan_u, &total);  // barrier
  uint64_t budget = 0;
  if (!budget_fn(total, budget)) return false;
  // acc: weight of the candidates above bucket d (those above the prefix range included).
  uint64_t acc = rs.above + excl;
  int cand = INT_MAX;
  uint64_t cand_above = 0;
  for (int j = 0; j < bpt; ++j) {
    const int d = dtop - j;
    const unsigned c = sh.count[d];
    if (c == 0) continue;
    if (acc > budget) break;
    cand = d;
    cand_above = acc;
    acc += kWeighted ? bucket_mass(sh, d) : static_cast<uint64_t>(c);
  }
  // The weight above a bucket only grows as the digit falls, so the lowest qualifying bucket of
  // the block is the minimum of the per-thread ones.
  block_min_pair(cand, cand_above, sh.pair_i, sh.pair_u);  // barrier
  // Some bucket always qualifies (the top non-empty one has rs.above <= budget above it);
  // INT_MAX would mean a broken invariant, and then the prefix is left as it is.
  if (cand != INT_MAX) {
    rs.prefix |= static_cast<uint32_t>(cand) << shift;
    rs.above = cand_above;
  }
  rs.mask |= static_cast<uint32_t>(nb - 1) << shift;
  return true;
}

// ---------------------------------------------------------------------------------------------
// The draw's weight of one token: mass_weight(ff_exp(tempered(g, m, T)), bits) when kept, else 0.

struct DrawCtx {
  float cut, m, gap, temperature;
  bool t_is_one;
  int bits;
};

__device__ __forceinline__ uint64_t draw_weight(float g, const DrawCtx& c) {
  const float d = kernels::ff_sub(g, c.m);
  const bool kept = g >= c.cut && g != -kernels::positive_infinity_f32() && d >= c.gap;
  if (!kept) return 0;
  // tempered(g, m, 1) == ff_sub(g, m) exactly; the division is by far the dearest step otherwise.
  const float x = c.t_is_one ? d : kernels::tempered(g, c.m, c.temperature);
  return kernels::mass_weight(kernels::ff_exp(x), c.bits);
}

template <typename scalar_t>
__device__ __forceinline__ void write_row(const SampleArgs<scalar_t>& a, int64_t row, int64_t token, float prob,
                                          int32_t status) {
  a.tokens[row] = token;
  a.probs[row] = prob;
  a.status[row] = status;
}

// ---------------------------------------------------------------------------------------------
// The kernel. Barrier notes: every __syncthreads below is reached by all threads of the block
// (all branches around them depend only on block-uniform values: parameters, reduced values,
// values broadcast through shared memory). Each row starts with a barrier, so a row never
// overwrites shared memory that the previous row may still be reading.

template <typename scalar_t, bool kCfg, bool kSmem>
__global__ void __launch_bounds__(kThreads, kSmem ? 2 : 1) sample_tokens_kernel(const SampleArgs<scalar_t> a) {
  using S = store_t<scalar_t, kCfg>;
  using View = std::conditional_t<kSmem, SmemRowView<scalar_t, kCfg>, GlobalRowView<scalar_t, kCfg>>;
  constexpr int kVec = View::kVec;
  constexpr int kLoadVec = 16 / static_cast<int>(sizeof(scalar_t));  // elements per 16-byte load
  static_assert(kLoadVec % 4 == 0, "a 16-byte load of logits fills whole float4s of guided floats");
  // 16-byte loads in flight per thread and row while loading (CFG loads two rows, so it unrolls
  // half as far: the same bytes in flight, and no register spills under the 64-register cap).
  constexpr int kLoadUnroll = kCfg ? 2 : 4;

  __shared__ SampleSmem sh;
  FF_DYNAMIC_SMEM(row_smem);
  S* const srow = reinterpret_cast<S*>(row_smem);

  const float kInf = kernels::positive_infinity_f32();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int V = a.V;

  for (int64_t row = blockIdx.x; row < a.R; row += gridDim.x) {
    __syncthreads();  // the previous row is done with every shared buffer

    // ---- 1. parameters (identical in every thread) ----
    SampleParams p;
    p.temperature = a.params.ptr[0][row * a.params.stride[0]];
    p.top_k = a.params.ptr[1][row * a.params.stride[1]];
    p.top_p = a.params.ptr[2][row * a.params.stride[2]];
    p.min_p = a.params.ptr[3][row * a.params.stride[3]];
    p.cfg_scale = a.params.ptr[4][row * a.params.stride[4]];
    int32_t st = kernels::validate_sample_params(p);
    if (st != kernels::kSampleOk) {
      if (tid == 0) write_row(a, row, -1, kernels::quiet_nan_f32(), st);
      continue;
    }
    // temperature 0 takes the first maximum whatever the filters keep (the CPU computes the cut
    // and ignores it), so the filters only run when sampling.
    const bool sampling = p.temperature != 0.0f;
    const int64_t k_top = kernels::effective_top_k(p.top_k, V);
    const bool topk_on = sampling && k_top > 0 && k_top < V;
    if (topk_on) {
      for (int d = tid; d < kMaxBuckets; d += kThreads) sh.count[d] = 0u;
    }
    __syncthreads();  // zeroed histogram before the load's atomics

    // ---- 2. load: global -> (smem), max, flags, top-k digit 0 histogram ----
    const scalar_t* const cond = a.cond + row * a.cs0;
    const scalar_t* const uncond = kCfg ? a.uncond + row * a.us0 : nullptr;
    const float scale = p.cfg_scale;
    // Vectorize when the row is contiguous and (with CFG) both rows share the 16-byte phase: the
    // first `head` tokens are loaded one by one until the address is 16-byte aligned. pad shifts
    // the smem copy so those vectors also land on 16-byte boundaries there.
    int head = 0, nbody = 0;
    if (a.cs1 == 1 && (!kCfg || a.us1 == 1)) {
      const uint32_t phase = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(cond) & 15u);
      const bool same_phase =
          !kCfg || static_cast<uint32_t>(reinterpret_cast<uintptr_t>(uncond) & 15u) == phase;
      if (same_phase && phase % sizeof(scalar_t) == 0) {
        head = static_cast<int>(((16u - phase) & 15u) / sizeof(scalar_t));
        head = head < V ? head : V;
        nbody = (V - head) / kLoadVec;
      }
    }
    const int pad = kSmem ? (kLoadVec - head % kLoadVec) % kLoadVec : 0;

    float mx = -kInf;
    bool any_nan = false, any_pos_inf = false;
    auto account = [&](float v) {
      mx = fmaxf(mx, v);
      any_nan |= v != v;
      any_pos_inf |= v == kInf;
      if (topk_on && v != -kInf) atomicAdd(&sh.count[kernels::ordered_key(v) >> 21], 1u);
    };

    {
      const uint4* const cvec = reinterpret_cast<const uint4*>(cond + head);
      const uint4* const uvec = kCfg ? reinterpret_cast<const uint4*>(uncond + head) : nullptr;
      for (int i0 = tid; i0 < nbody; i0 += kLoadUnroll * kThreads) {
        uint4 rc[kLoadUnroll], ru[kLoadUnroll];
        // All loads first, so each thread keeps kLoadUnroll 16-byte requests in flight.
#pragma unroll
        for (int u = 0; u < kLoadUnroll; ++u) {
          const int i = i0 + u * kThreads;
          rc[u] = make_uint4(0u, 0u, 0u, 0u);
          ru[u] = make_uint4(0u, 0u, 0u, 0u);
          if (i < nbody) {
            rc[u] = __ldg(cvec + i);
            if constexpr (kCfg) ru[u] = __ldg(uvec + i);
          }
        }
#pragma unroll
        for (int u = 0; u < kLoadUnroll; ++u) {
          const int i = i0 + u * kThreads;
          if (i >= nbody) continue;
          float v[kLoadVec];
          decode16<scalar_t>(rc[u], v);
          if constexpr (kCfg) {
            float w[kLoadVec];
            decode16<scalar_t>(ru[u], w);
#pragma unroll
            for (int e = 0; e < kLoadVec; ++e) v[e] = kernels::guided_logit(v[e], w[e], scale);
          }
#pragma unroll
          for (int e = 0; e < kLoadVec; ++e) account(v[e]);
          if constexpr (kSmem) {
            S* const dst = srow + pad + head + i * kLoadVec;  // 16-byte aligned by the choice of pad
            if constexpr (kCfg) {
#pragma unroll
              for (int q = 0; q < kLoadVec / 4; ++q) {
                reinterpret_cast<float4*>(dst)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
              }
            } else {
              *reinterpret_cast<uint4*>(dst) = rc[u];
            }
          }
        }
      }
      // Head and tail (everything, for strided rows) one token per thread.
      const int tail0 = head + nbody * kLoadVec;
      const int nextra = head + (V - tail0);
      for (int e = tid; e < nextra; e += kThreads) {
        const int t = e < head ? e : tail0 + (e - head);
        const scalar_t raw = cond[t * a.cs1];
        float v = static_cast<float>(raw);
        if constexpr (kCfg) v = kernels::guided_logit(v, static_cast<float>(uncond[t * a.us1]), scale);
        account(v);
        if constexpr (kSmem) {
          if constexpr (kCfg) {
            srow[pad + t] = v;
          } else {
            srow[pad + t] = raw;
          }
        }
      }
    }

    // Block reduce max and flags. fmaxf drops NaN, which only matters for rows that fail anyway.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
    const bool warp_nan = __any_sync(kFullMask, any_nan);
    const bool warp_pos_inf = __any_sync(kFullMask, any_pos_inf);
    if (lane == 0) {
      sh.load_max[warp] = mx;
      sh.load_flags[warp] = (warp_nan ? 1 : 0) | (warp_pos_inf ? 2 : 0);
    }
    __syncthreads();  // also completes the smem row and the top-k digit-0 histogram
    float m = -kInf;
    int flags = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      m = fmaxf(m, sh.load_max[w]);
      flags |= sh.load_flags[w];
    }
    if (flags & 1) {
      st = kernels::kSampleNaN;
    } else if ((flags & 2) || m == -kInf) {
      st = kernels::kSampleNoFinite;
    }
    if (st != kernels::kSampleOk) {
      if (tid == 0) write_row(a, row, -1, kernels::quiet_nan_f32(), st);
      continue;
    }

    View view;
    if constexpr (kSmem) {
      view.base = row_smem;
    } else {
      view.cond = cond;
      view.uncond = uncond;
      view.cs1 = a.cs1;
      view.us1 = a.us1;
      view.scale = scale;
    }
    view.V = V;
    view.pad = pad;
    view.nvec = (pad + V + kVec - 1) / kVec;

    // ---- 3. temperature 0: the first index holding the maximum ----
    if (!sampling) {
      int best = INT_MAX;
      for (int k = tid; k < view.nvec; k += kThreads) {
        float g[kVec];
        view.load(k, g);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          if (g[i] == m) best = min(best, k * kVec - pad + i);
        }
      }
      best = warp_min_int(best);
      if (lane == 0) sh.argmax_i[warp] = best;
      __syncthreads();
      if (tid == 0) {
        int token = INT_MAX;
        for (int w = 0; w < kWarps; ++w) token = min(token, sh.argmax_i[w]);
        // token < V always: the maximum is a finite logit of the row.
        write_row(a, row, token == INT_MAX ? -1 : static_cast<int64_t>(token), token == INT_MAX ? kernels::quiet_nan_f32() : 1.0f,
                  kernels::kSampleOk);
      }
      continue;
    }

    const int bits = kernels::mass_scale_bits(V);
    float cut = -kInf;

    // ---- 4a. top-k: the k-th largest finite logit (ties kept) ----
    if (topk_on) {
      RadixState rs{0u, 0u, 0u};
      bool chosen = true;
#pragma unroll 1
      for (int pass = 0; pass < 3; ++pass) {
        const int nb = digit_buckets(pass), shift = digit_shift(pass);
        if (pass > 0) {  // digit 0 was counted during the load
          for (int d = tid; d < nb; d += kThreads) sh.count[d] = 0u;
          __syncthreads();
          histogram_pass<false>(view, sh, -kInf, m, bits, rs, shift, static_cast<uint32_t>(nb - 1));
          __syncthreads();
        }
        chosen = select_digit<false>(sh, nb, shift, rs, [&](uint64_t total, uint64_t& budget) {
          // total = number of finite logits; the CPU applies top-k only when k < n.
          if (pass == 0 && !(k_top < static_cast<int64_t>(total))) return false;
          budget = static_cast<uint64_t>(k_top - 1);
          return true;
        });
        if (!chosen) break;
      }
      if (chosen) cut = kernels::key_to_float(rs.prefix);
    }

    // ---- 4b. top-p over the top-k survivors ----
    if (p.top_p < 1.0f) {
      RadixState rs{0u, 0u, 0u};
      uint64_t budget_p = 0;
#pragma unroll 1
      for (int pass = 0; pass < 3; ++pass) {
        const int nb = digit_buckets(pass), shift = digit_shift(pass);
        for (int d = tid; d < nb; d += kThreads) {
          sh.count[d] = 0u;
          sh.mass_lo[d] = 0u;
          sh.mass_hi[d] = 0u;
        }
        __syncthreads();
        histogram_pass<true>(view, sh, cut, m, bits, rs, shift, static_cast<uint32_t>(nb - 1));
        __syncthreads();
        select_digit<true>(sh, nb, shift, rs, [&](uint64_t total, uint64_t& budget) {
          // Pass 0 covers every candidate, so its total is Q.
          if (pass == 0) budget_p = kernels::top_p_budget(p.top_p, total);
          budget = budget_p;
          return true;
        });
      }
      const float key_cut = kernels::key_to_float(rs.prefix);
      cut = cut < key_cut ? key_cut : cut;  // std::max(cut, key_cut)
    }

    // ---- 5. draw ----
    DrawCtx ctx;
    ctx.cut = cut;
    ctx.m = m;
    ctx.gap = kernels::min_p_logit_gap(p.min_p);
    ctx.temperature = p.temperature;
    ctx.t_is_one = p.temperature == 1.0f;
    ctx.bits = bits;

    // Warp w owns vectors [kbeg, kend): contiguous token ranges in warp order. It walks them in
    // steps of 32 vectors (lane l takes vector kbeg + 32 s + l, so a step is a contiguous run in
    // lane order), grouped into at most kMaxChunks chunks of spc steps whose warp totals are kept:
    // the re-walk below then only repeats the one chunk that holds the crossing.
    const int vpw = (view.nvec + kWarps - 1) / kWarps;
    const int kbeg = min(view.nvec, warp * vpw);
    const int kend = min(view.nvec, kbeg + vpw);
    const int steps = (vpw + 31) / 32;  // >= 1, block-uniform
    const int spc = (steps + kMaxChunks - 1) / kMaxChunks;
    const int nchunks = (steps + spc - 1) / spc;
    uint64_t warp_total = 0;
    for (int c = 0; c < nchunks; ++c) {  // block-uniform trip counts: the shuffles see full warps
      uint64_t lane_sum = 0;
      const int s_end = min(steps, (c + 1) * spc);
      for (int s = c * spc; s < s_end; ++s) {
        const int k = kbeg + 32 * s + lane;
        if (k < kend) {
          float g[kVec];
          view.load(k, g);
#pragma unroll
          for (int i = 0; i < kVec; ++i) lane_sum += draw_weight(g[i], ctx);
        }
      }
      const uint64_t chunk_total = warp_sum_u64(lane_sum);  // in every lane
      if (lane == 0) sh.chunk_u[warp][c] = chunk_total;
      warp_total += chunk_total;
    }
    if (lane == 0) sh.draw_u[warp] = warp_total;
    __syncthreads();
    if (warp == 0) {
      const uint64_t mine = lane < kWarps ? static_cast<uint64_t>(sh.draw_u[lane]) : 0;
      const uint64_t incl = warp_inclusive_scan_u64(mine, lane);
      const uint64_t total = __shfl_sync(kFullMask, incl, 31);
      // total >= 2^bits > 0: the first maximum is kept with weight exp(0) = 1.
      const uint64_t target = kernels::draw_target(total, static_cast<uint64_t>(*a.seed),
                                                   static_cast<uint64_t>(*a.offset), static_cast<uint32_t>(row));
      const unsigned hit = __ballot_sync(kFullMask, incl > target);  // lanes >= kWarps repeat total
      const int w = __ffs(hit) - 1;                                   // hit != 0 since total > target
      const uint64_t before = __shfl_sync(kFullMask, incl - mine, w & 31);
      if (lane == 0) {
        sh.draw_total = total;
        sh.draw_target = target;
        sh.draw_before = before;
        sh.draw_warp = w;
      }
    }
    __syncthreads();
    if (warp == sh.draw_warp) {  // warp-uniform
      const uint64_t total = sh.draw_total, target = sh.draw_target;
      const uint64_t before = sh.draw_before;  // weight of all tokens before this warp's range
      // The chunk holding the crossing: the first whose inclusive prefix passes the target.
      const uint64_t mine = lane < nchunks ? static_cast<uint64_t>(sh.chunk_u[warp][lane]) : 0;
      const uint64_t cincl = warp_inclusive_scan_u64(mine, lane);
      const unsigned chit = __ballot_sync(kFullMask, before + cincl > target);  // lanes >= nchunks
      const int c = (__ffs(chit) - 1) & 31;                                    // repeat the total
      uint64_t running = before + __shfl_sync(kFullMask, cincl - mine, c);
      bool found = false;
      const int s_end = min(steps, (c + 1) * spc);
      for (int s = c * spc; s < s_end; ++s) {  // warp-uniform trip count
        const int k = kbeg + 32 * s + lane;
        uint64_t w[kVec];
        uint64_t lsum = 0;
        if (k < kend) {
          float g[kVec];
          view.load(k, g);
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            w[i] = draw_weight(g[i], ctx);
            lsum += w[i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) w[i] = 0;
        }
        const uint64_t incl = warp_inclusive_scan_u64(lsum, lane);
        const uint64_t seg = __shfl_sync(kFullMask, incl, 31);
        if (running + seg > target) {
          // The first lane whose inclusive prefix passes the target holds the token; inside it,
          // the first element whose running sum passes it (its weight is > 0 by construction).
          const unsigned hit = __ballot_sync(kFullMask, running + incl > target);
          if (lane == __ffs(hit) - 1) {
            uint64_t acc = running + incl - lsum;
            int64_t token = -1;
            float prob = kernels::quiet_nan_f32();
#pragma unroll
            for (int i = 0; i < kVec; ++i) {
              acc += w[i];
              if (token < 0 && acc > target) {
                token = k * kVec - view.pad + i;
                prob = kernels::drawn_probability(w[i], total);
              }
            }
            write_row(a, row, token, prob, kernels::kSampleOk);
          }
          found = true;
          break;
        }
        running += seg;
      }
      // Unreachable (the running sum reaches total > target); mirrors the CPU's fallback.
      if (!found && lane == 0) write_row(a, row, -1, kernels::quiet_nan_f32(), kernels::kSampleOk);
    }
  }
}

}  // namespace
}  // namespace fourm_fast
