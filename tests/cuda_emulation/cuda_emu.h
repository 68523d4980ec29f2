// Host emulation of the CUDA features the masked_attention, vq_lookup and sample_tokens kernels
// use, so that the kernels of csrc/cuda/*_kernels.cuh (the exact source the extension compiles)
// run on a CPU:
//   - one std::thread per GPU thread, blocks run one after another (a 1-D or 2-D grid);
//   - static __shared__ arrays are function-local statics: shared by the threads of a block, and
//     by the blocks after it, which run later. They start zeroed, where a GPU's start as garbage,
//     so a kernel that reads one before writing it would pass here (none does; a template static
//     cannot be poisoned through a linker section with GCC);
//   - __syncthreads / __syncwarp are std::barrier waits; the warp collectives (__shfl*_sync,
//     __ballot_sync, __any_sync) exchange through the warp's slots between two barrier waits, so
//     every lane must take part, as the full masks they are called with promise; shared-memory
//     atomics are host atomics;
//   - dynamic shared memory is a per-block buffer filled with 0xFF bytes (NaN in every float
//     format), so a read of smem nobody wrote shows up as NaN in the results;
//   - a cp.async copy poisons its destination (0xFF bytes) when issued and delivers the data only
//     when the issuing thread's cp.async.wait_group retires its group (the latest moment the PTX
//     ISA allows): a read that the pipeline does not wait for, or of a stage being refilled, sees
//     NaN; copies never committed or never waited for are dropped at block exit (they stay NaN);
//   - ldmatrix (plain and .trans) and mma.m16n8k16 (bf16 / fp16 in, fp32 accumulate) move the
//     fragments of the PTX ISA's layouts between the lanes of a warp. The products are summed in
//     float64 and rounded once, which a GPU's tensor cores do not promise: tolerances, not bits.
// What it cannot show: timing-dependent behaviour of real hardware (memory ordering between
// blocks, bank conflicts, register limits). compute-sanitizer's racecheck on a GPU covers races.
#pragma once

#include <algorithm>
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

using std::max;
using std::min;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

constexpr int kMaxWarps = 16;

struct Warp {
  std::unique_ptr<std::barrier<>> bar;
  const void* addr[32];
  uint32_t a[32][4], b[32][2];
  uint64_t raw[32];  // one shuffled value per lane (up to 8 bytes)
};

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

// One thread's cp.async state: committed groups (oldest first) and the copies not yet committed.
struct AsyncCopies {
  std::vector<std::vector<PendingCopy>> groups;
  std::vector<PendingCopy> open;
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Warp warps[kMaxWarps];
};

inline thread_local Dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local Block* block;
inline thread_local AsyncCopies async_copies;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA EMULATION: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

inline unsigned char* dynamic_smem() { return block->smem; }
inline Warp& warp() { return block->warps[thread_idx.x / 32]; }
inline int lane() { return static_cast<int>(thread_idx.x % 32); }

inline void check_smem(const void* p, size_t n, size_t align) {
  const auto u = reinterpret_cast<uintptr_t>(p), s = reinterpret_cast<uintptr_t>(block->smem);
  if (u < s || u + n > s + block->smem_bytes) fail("shared-memory access outside the dynamic allocation");
  if ((u - s) % align != 0) fail("misaligned shared-memory access");
}

inline void syncthreads() { block->bar->arrive_and_wait(); }
inline void syncwarp() { warp().bar->arrive_and_wait(); }

inline void check_full(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(what);
}

// Every lane posts v; lane l receives the value of lane src(l) (its own when src(l) is out of range).
template <class T, class Src>
inline T exchange(T v, Src src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Warp& w = warp();
  const int l = lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.raw[l] = bits;
  w.bar->arrive_and_wait();
  const int from = src(l);
  const uint64_t got = w.raw[from >= 0 && from < 32 ? from : l];
  w.bar->arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

template <class T>
inline T shfl_xor(unsigned mask, T v, int offset) {
  check_full(mask, "__shfl_xor_sync with a partial mask");
  return exchange(v, [&](int l) { return l ^ (offset & 31); });  // PTX uses the low 5 bits
}

template <class T>
inline T shfl_up(unsigned mask, T v, unsigned delta) {
  check_full(mask, "__shfl_up_sync with a partial mask");
  return exchange(v, [&](int l) { return l - static_cast<int>(delta & 31u); });
}

template <class T>
inline T shfl(unsigned mask, T v, int src_lane) {
  check_full(mask, "__shfl_sync with a partial mask");
  return exchange(v, [&](int) { return src_lane & 31; });
}

inline unsigned ballot(unsigned mask, bool pred) {
  check_full(mask, "__ballot_sync with a partial mask");
  Warp& w = warp();
  w.raw[lane()] = pred ? 1u : 0u;
  w.bar->arrive_and_wait();
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= static_cast<unsigned>(w.raw[i]) << i;
  w.bar->arrive_and_wait();
  return bits;
}

template <class T>
inline T atomic_add(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

inline float uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- 16-bit formats ------------------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 by bits (no _Float16: GCC supports it on x86 only from version 12).
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    u = sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;  // signed zero
  } else {     // subnormal: man * 2^-24, exact in float
    const float f = std::ldexp(static_cast<float>(man), -24);
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past the largest half
  if (a < 0x1p-14f) {  // subnormal half: a multiple of 2^-24, rounded to nearest even by rint
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24f)));
  }
  uint32_t bits;
  std::memcpy(&bits, &a, 4);
  const uint32_t exp = (bits >> 23) - 127 + 15, man = bits & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;  // the 13 dropped bits
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still right
  return static_cast<uint16_t>(sign | h);
}

// Storage types the harnesses instantiate the kernels' scalar_t with (what c10::BFloat16 and
// c10::Half are to the extension): converting from float rounds to nearest even.
struct FromBits {};  // c10's T(bits, T::from_bits()) constructor tag

struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  explicit Bf16(float f) : bits(float_to_bf16(f)) {}
  Bf16(unsigned short b, FromBits) : bits(b) {}
  static constexpr FromBits from_bits() { return {}; }
  operator float() const { return bf16_to_float(bits); }
};

struct Fp16 {
  uint16_t bits;
  Fp16() = default;
  explicit Fp16(float f) : bits(float_to_fp16(f)) {}
  Fp16(unsigned short b, FromBits) : bits(b) {}
  static constexpr FromBits from_bits() { return {}; }
  operator float() const { return fp16_to_float(bits); }
};

// ---- cp.async ------------------------------------------------------------------------------
inline void cp_async_16(void* dst, const void* src, bool valid) {
  check_smem(dst, 16, 16);
  std::memset(dst, 0xFF, 16);  // in flight: what a reader sees before the wait is garbage (NaN)
  PendingCopy c{dst, {}};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
    std::memcpy(c.bytes, src, 16);  // global memory does not change during a kernel
  }  // else src-size 0: the destination is zero-filled
  async_copies.open.push_back(c);
}

inline void cp_async_commit() {
  async_copies.groups.push_back(std::move(async_copies.open));
  async_copies.open.clear();
}

inline void cp_async_wait(int pending) {
  auto& g = async_copies.groups;
  while (static_cast<int>(g.size()) > pending) {
    for (const PendingCopy& c : g.front()) std::memcpy(c.dst, c.bytes, 16);
    g.erase(g.begin());
  }
}

// ---- ldmatrix / mma ------------------------------------------------------------------------
// ldmatrix.m8n8.x4(.trans).b16: lane l gives the address of row l % 8 of matrix l / 8. Plain:
// r[i] of lane l = elements (l / 4, 2 (l % 4) .. +1) of matrix i; .trans: elements
// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  check_smem(row_addr, 16, 16);
  Warp& w = warp();
  const int l = lane();
  w.addr[l] = row_addr;
  w.bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const auto* row = static_cast<const uint16_t*>(w.addr[i * 8 + l / 4]);
      r[i] = static_cast<uint32_t>(row[2 * (l % 4)]) | (static_cast<uint32_t>(row[2 * (l % 4) + 1]) << 16);
    } else {
      const auto* r0 = static_cast<const uint16_t*>(w.addr[i * 8 + 2 * (l % 4)]);
      const auto* r1 = static_cast<const uint16_t*>(w.addr[i * 8 + 2 * (l % 4) + 1]);
      r[i] = static_cast<uint32_t>(r0[l / 4]) | (static_cast<uint32_t>(r1[l / 4]) << 16);
    }
  }
  w.bar->arrive_and_wait();
}

// mma.m16n8k16.row.col.f32: with g = lane / 4, c = lane % 4, A's a[0..3] hold (g, 2c..), (g+8, 2c..),
// (g, 2c+8..), (g+8, 2c+8..); B's b[0..1] hold (k 2c.., n g), (k 2c+8.., n g); C's c[0..3] hold
// (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1).
template <bool kBf16>
inline void mma_16x8x16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b[0];
  w.b[l][1] = b[1];
  w.bar->arrive_and_wait();
  auto value = [](uint32_t reg, int half) {
    const auto h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    return kBf16 ? bf16_to_float(h) : fp16_to_float(h);
  };
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, c = t % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * c + e] = value(w.a[t][0], e);
      A[g + 8][2 * c + e] = value(w.a[t][1], e);
      A[g][2 * c + 8 + e] = value(w.a[t][2], e);
      A[g + 8][2 * c + 8 + e] = value(w.a[t][3], e);
      B[2 * c + e][g] = value(w.b[t][0], e);
      B[2 * c + 8 + e][g] = value(w.b[t][1], e);
    }
  }
  const int g = l / 4, c = l % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
  for (int i = 0; i < 4; ++i) {
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[rows[i]][k]) * B[k][cols[i]];
    acc[i] = static_cast<float>(acc[i] + s);
  }
  w.bar->arrive_and_wait();
}

// ---- launch ---------------------------------------------------------------------------------
// A grid of blocks_x x blocks_y blocks of `threads` threads; `body` is the kernel call.
template <class F>
void launch(long blocks_x, long blocks_y, int threads, size_t smem_bytes, F&& body) {
  if (threads % 32 != 0 || threads / 32 > kMaxWarps) fail("block size must be whole warps, at most 16");
  for (long by = 0; by < blocks_y; ++by) {
    for (long bx = 0; bx < blocks_x; ++bx) {
      Block blk;
      blk.bar = std::make_unique<std::barrier<>>(threads);
      for (int w = 0; w < threads / 32; ++w) blk.warps[w].bar = std::make_unique<std::barrier<>>(32);
      std::vector<unsigned char> smem(smem_bytes ? smem_bytes : 1, 0xFF);
      blk.smem = smem.data();
      blk.smem_bytes = smem_bytes;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          thread_idx = {static_cast<unsigned>(t), 0, 0};
          block_idx = {static_cast<unsigned>(bx), static_cast<unsigned>(by), 0};
          block_dim = {static_cast<unsigned>(threads), 1, 1};
          grid_dim = {static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y), 1};
          block = &blk;
          async_copies = {};
          body();
        });
      }
      for (auto& t : pool) t.join();
    }
  }
}

template <class F>
void launch(long blocks, int threads, size_t smem_bytes, F&& body) {
  launch(blocks, 1, threads, smem_bytes, std::forward<F>(body));
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __syncthreads() emu::syncthreads()
#define __syncwarp() emu::syncwarp()
#define __shfl_xor_sync(mask, v, offset) emu::shfl_xor(mask, v, offset)
#define __shfl_up_sync(mask, v, delta) emu::shfl_up(mask, v, delta)
#define __shfl_sync(mask, v, src) emu::shfl(mask, v, src)
#define __ballot_sync(mask, pred) emu::ballot(mask, pred)
#define __any_sync(mask, pred) (emu::ballot(mask, pred) != 0u)
#define atomicAdd(p, v) emu::atomic_add(p, v)
#define __ffs(x) __builtin_ffs(static_cast<int>(x))
#define __ldg(p) (*(p))
#define __uint_as_float(u) emu::uint_as_float(u)
