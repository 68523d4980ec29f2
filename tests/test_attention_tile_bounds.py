"""The tile tests of csrc/kernels/attention_math.h (torch-free, shared with the CUDA executor),
compiled as host C++ and checked against the visibility rule pair by pair on random tiles:
attn_tiles_may_meet may only say "no" when no pair is visible (the kernels skip such tiles), and
attn_tiles_all_visible may only say "all" when every pair is (the kernels then drop the
per-element rule). The CUDA kernels themselves need a GPU (tests/test_attention_cuda.py); this
proves the bounds logic they rely on on any machine with a C++ compiler."""
from host_cpp import run_driver

DRIVER = r"""
#include <cstdio>
#include <random>
#include "kernels/attention_math.h"
using namespace fourm_fast::kernels;

int main() {
  std::mt19937 rng(12345);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  long errors = 0, pairs_skipped = 0, tiles_full = 0, tiles_full_true = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    const int nq = 1 + pick(8), nk = 1 + pick(8);
    const bool hs = pick(2), hr = pick(2), full_tile = pick(4) != 0, all_valid = pick(2);
    const int q_seg0 = pick(3), q_segs = 1 + pick(2), k_seg0 = pick(3), k_segs = 1 + pick(2);
    const int q_lim0 = pick(14) - 2, k_rank0 = pick(10);
    AttnQueryMeta q[8];
    AttnKeyMeta k[8];
    AttnTileBounds qb = attn_query_tile_start(), kb = attn_key_tile_start(full_tile);
    for (int i = 0; i < nq; ++i) {
      q[i] = {q_seg0 + pick(q_segs), q_lim0 + pick(4)};
      attn_query_tile_add(qb, q[i]);
    }
    for (int j = 0; j < nk; ++j) {
      k[j] = {all_valid || pick(5) != 0, k_seg0 + pick(k_segs), k_rank0 + pick(4)};
      attn_key_tile_add(kb, k[j]);
    }
    bool any = false, all = full_tile;  // a tile with keys past the end holds invalid keys
    for (int i = 0; i < nq; ++i)
      for (int j = 0; j < nk; ++j) {
        const bool v = attn_visible(q[i], k[j], hs, hr);
        any = any || v;
        all = all && v;
      }
    const bool meet = attn_tiles_may_meet(qb, kb, hs, hr), full = attn_tiles_all_visible(qb, kb, hs, hr);
    if (!meet && any) ++errors;
    if (full && !all) ++errors;
    pairs_skipped += !meet;
    tiles_full += full;
    tiles_full_true += all;
  }
  std::printf("%ld %ld %ld %ld\n", errors, pairs_skipped, tiles_full, tiles_full_true);
  return 0;
}
"""


def test_tile_bounds_never_skip_a_visible_pair_nor_call_a_masked_one_visible(tmp_path):
    errors, skipped, full, full_true = map(int, run_driver(DRIVER, tmp_path, "tile_bounds"))
    assert errors == 0
    # not vacuous: both shortcuts fire often, and the full-tile proof finds most fully visible tiles
    assert skipped > 10_000 and full > 10_000
    assert full >= 0.5 * full_true, (full, full_true)
