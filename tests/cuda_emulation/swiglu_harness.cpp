// Runs the swiglu CUDA kernels (csrc/cuda/swiglu_kernels.cuh, compiled as host C++ on cuda_emu.h)
// and checks every output bit for bit (NaN payloads aside) against the op's arithmetic (csrc/kernels/swiglu_math.h,
// which the CPU loops call too), rounded once to the dtype, with the buffers' tails untouched.
// Grids are smaller than the element count, so threads loop as they do on a GPU past its
// sms * 32 blocks. Inputs mix normal values with +-inf, NaN, +-0 and values whose e^-a overflows.
//
// Modes (harness_main.h): fixed [COUNT], race (a few cases for -fsanitize=thread).
#include "cuda_emu.h"
#include "harness_main.h"

#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/swiglu_kernels.cuh"

using namespace fourm_fast;
using emu::Bf16;
using emu::Fp16;

namespace {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct Case {
  long n;
  Dtype dtype;
  long blocks;
  int threads;
};

const char* dtype_name(Dtype d) { return d == Dtype::kFloat32 ? "f32" : (d == Dtype::kFloat16 ? "f16" : "bf16"); }

constexpr long kTail = 9;  // elements past n that no kernel may write

template <class T>
std::vector<T> inputs(long n) {
  const float specials[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f, 100.0f, -100.0f, -90.0f};
  std::vector<T> v(n + kTail);
  for (long i = 0; i < n; ++i) v[i] = T(harness::pick(11) == 0 ? specials[harness::pick(8)] : harness::randn(4.0f));
  return v;
}

template <class T>
std::vector<T> poisoned(long n) {
  std::vector<T> v(n + kTail);
  // 0x5a bytes: a finite value in every dtype (1.5e16, 1.5e16, 203), so an element the kernel
  // left unwritten fails even where the expected result is NaN
  std::memset(v.data(), 0x5A, v.size() * sizeof(T));
  return v;
}

template <class T>
bool same_bits(T x, T y) {
  return std::memcmp(&x, &y, sizeof(T)) == 0;
}

// Bit for bit, except that any NaN matches any NaN: which operand's NaN an IEEE operation passes on
// depends on the order the compiler put them in (and a GPU returns one canonical NaN).
template <class T>
void check(const char* what, const std::vector<T>& got, long i, float want) {
  const float have = static_cast<float>(got[i]);
  if (!(have != have && want != want) && !same_bits(got[i], T(want))) {
    std::printf("  FAIL %s[%ld]: got %g, want %g\n", what, i, static_cast<double>(static_cast<float>(got[i])),
                static_cast<double>(want));
    ++harness::failures;
  }
}

template <class T>
void check_tail(const char* what, const std::vector<T>& got, long n) {
  const std::vector<T> clean = poisoned<T>(n);
  for (long i = n; i < n + kTail; ++i) {
    if (!same_bits(got[i], clean[i])) {
      std::printf("  FAIL %s[%ld] past n = %ld was written\n", what, i, n);
      ++harness::failures;
    }
  }
}

template <class T>
void run_case(const Case& c) {
  const long n = c.n;
  const std::vector<T> a = inputs<T>(n), b = inputs<T>(n), g = inputs<T>(n);
  std::vector<T> out = poisoned<T>(n), da = poisoned<T>(n), db = poisoned<T>(n);
  emu::launch(c.blocks, c.threads, 0, [&] { swiglu_fwd_kernel<T>(a.data(), b.data(), out.data(), n); });
  emu::launch(c.blocks, c.threads, 0, [&] { swiglu_bwd_kernel<T>(g.data(), a.data(), b.data(), da.data(), db.data(), n); });
  for (long i = 0; i < n; ++i) {
    const float fa = static_cast<float>(a[i]), fb = static_cast<float>(b[i]);
    check("out", out, i, kernels::swiglu_fwd(fa, fb));
    const kernels::SwigluGrads r = kernels::swiglu_bwd(static_cast<float>(g[i]), fa, fb);
    check("grad_gate", da, i, r.gate);
    check("grad_up", db, i, r.up);
  }
  check_tail("out", out, n);
  check_tail("grad_gate", da, n);
  check_tail("grad_up", db, n);
}

void run(const Case& c) {
  char label[96];
  std::snprintf(label, sizeof label, "n%ld %s grid %ldx%d", c.n, dtype_name(c.dtype), c.blocks, c.threads);
  harness::report(label, [&] {
    switch (c.dtype) {
      case Dtype::kFloat32: run_case<float>(c); break;
      case Dtype::kFloat16: run_case<Fp16>(c); break;
      case Dtype::kBFloat16: run_case<Bf16>(c); break;
    }
  });
}

// n of 1, below, at and above one pass of the grid (blocks * threads), and several passes.
std::vector<Case> fixed_cases() {
  using D = Dtype;
  return {{1, D::kFloat32, 1, 32},     {31, D::kFloat32, 1, 32},   {64, D::kBFloat16, 2, 32},
          {65, D::kFloat16, 2, 32},    {200, D::kFloat32, 3, 64},  {997, D::kBFloat16, 2, 64},
          {1000, D::kFloat16, 5, 32},  {4099, D::kFloat32, 4, 128}, {0, D::kFloat32, 1, 32}};
}

std::vector<Case> race_cases() { return {{300, Dtype::kFloat32, 2, 64}, {129, Dtype::kBFloat16, 3, 32}}; }

}  // namespace

int main(int argc, char** argv) {
  return harness::main<Case>(argc, argv, 11, {fixed_cases(), race_cases(), {}}, run);
}
