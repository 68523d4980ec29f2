"""csrc/kernels/philox.h, compiled as host C++: Philox4x32-10 against the known-answer vectors of
the Random123 distribution (Salmon et al. 2011), and uniform_open01 over every input it can
distinguish (it reads the top 24 bits): strictly inside (0, 1), exact, and monotone."""
from host_cpp import run_driver

DRIVER = r"""
#include <cstdio>
#include "kernels/philox.h"
using namespace fourm_fast::kernels;

int main() {
  // counter words, key words, expected output (Random123's kat_vectors, philox4x32 10 rounds)
  const uint32_t kat[3][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
      {~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
      {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u,
       0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
  long kat_errors = 0;
  for (const auto& t : kat) {
    const Philox4 out = philox4x32_10(Philox4{{t[0], t[1], t[2], t[3]}}, t[4], t[5]);
    for (int i = 0; i < 4; ++i) kat_errors += out.v[i] != t[6 + i];
  }
  long outside = 0, not_exact = 0, decreasing = 0;
  float prev = 0.0f;
  for (uint32_t top = 0; top < (1u << 24); ++top) {
    const float u = uniform_open01((top << 8) | (top & 0xffu));  // low bits must not matter
    outside += !(u > 0.0f && u < 1.0f);
    not_exact += static_cast<double>(u) * 16777216.0 != static_cast<double>(top | 1u);
    decreasing += u < prev;
    prev = u;
  }
  std::printf("%ld %ld %ld %ld %.17g\n", kat_errors, outside, not_exact, decreasing,
              static_cast<double>(uniform_open01(~0u)));
  return 0;
}
"""


def test_philox_known_answers_and_open_unit_interval(tmp_path):
    kat, outside, not_exact, decreasing, top = run_driver(DRIVER, tmp_path, "philox")
    assert int(kat) == 0, "Philox4x32-10 differs from the published known answers"
    assert int(outside) == 0 and int(not_exact) == 0 and int(decreasing) == 0, (outside, not_exact, decreasing)
    assert float(top) == 1 - 2**-24  # the largest draw, strictly below 1 (it was exactly 1.0)
