#!/usr/bin/env python
"""x @ W.T on the CPU for a few rows: F.linear's operand order against (W @ x.T).T, the order
fourm_fast/nn/few_rows.py takes for 2-32 float32 rows (a decoding step's linear layers and head).

Rows and widths are 4M's tiny preset (dim 384, MLP hidden 1024, qkv 1152) and its vocabularies
(8192, 16384, 30522). Each pair of timings alternates the two orders and keeps the best of
--repeats, so a drifting machine hurts both alike. "ratio" is F.linear's time over the swapped
order's: above 1 the swap wins. Rerun it on another CPU before trusting the threshold there.

  python bench/bench_linear_rows.py
  python bench/bench_linear_rows.py --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.utils import append_results, environment, set_threads  # noqa: E402
from fourm_fast.nn.few_rows import FEW_ROWS_MAX  # noqa: E402

SHAPES = [(384, 384), (1152, 384), (1024, 384), (384, 1024), (8192, 384), (16384, 384), (30522, 384)]
ROWS = [1, 4, 8, 32, 128, 512]


def best_of_alternating(a, b, repeats: int) -> tuple[float, float]:
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(ta) * 1e3, min(tb) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    env = environment("cpu")
    print(f"# x @ W.T, float32, on {env['device_name']} ({torch.get_num_threads()} threads), sha {env['git_sha']}; "
          f"few_rows swaps for 2-{FEW_ROWS_MAX} rows")
    print(f"{'N':>6} {'K':>5} " + " ".join(f"{f'{m} rows':>9}" for m in ROWS))
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        cells = []
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            lin, swapped = best_of_alternating(lambda: F.linear(x, w), lambda: torch.mm(w, x.t()).t(), args.repeats)
            ratio = lin / swapped
            cells.append(f"{ratio:>8.2f}x")
            rows.append({"op": "linear_rows", "n": n, "k": k, "rows": m, "linear_ms": round(lin, 4),
                         "swapped_ms": round(swapped, 4), "ratio": round(ratio, 3), "repeats": args.repeats})
        print(f"{n:>6} {k:>5} " + " ".join(cells), flush=True)
    if not args.no_save:
        print(f"# appended {len(rows)} rows to {append_results('linear_rows', rows, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
