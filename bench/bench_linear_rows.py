#!/usr/bin/env python
"""x @ W.T on the CPU for a few rows, with W cold in memory as in a decoding step:
F.linear, the swapped order (W @ x.T).T, and fourm_fast.ops.rows_linear side by side.

Shapes are 4M's tiny preset (dim 384: qkv 1152, MLP 1024, projections 384) with its 8192 and
30522 (text) heads, and the base preset's blocks (dim 768: qkv 2304, SwiGLU MLP fc1/fc3 2048 x 768
and fc2 768 x 2048) and text head. A decoding step reads every weight once and the whole set does not
fit in cache, so each call here takes the next of enough copies of W to fill --pool-mib: the time
is that of streaming W from memory. Each method's median over --calls calls is reported as GB/s of
weight read, against a roofline: the best of three timed reads of a --pool-mib tensor (sum), on the
same threads. "vs linear" is F.linear's time over the method's: above 1 the method wins.

fourm_fast/nn/few_rows.py sends FEW_ROWS_MIN-FEW_ROWS_MAX float32 rows times a weight of at least
ROWS_LINEAR_MIN_BYTES (the output heads), and 1-FEW_ROWS_MAX_HALF bfloat16/float16 rows of most
weights, to rows_linear; rerun this on another CPU before trusting those choices there.

  python bench/bench_linear_rows.py
  python bench/bench_linear_rows.py --threads 1
  python bench/bench_linear_rows.py --dtype bfloat16   # x and W in bf16 (what a bf16 model decodes with)
  python bench/bench_linear_rows.py --shapes 2048x768 768x2048   # a subset (N x K)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.utils import append_results, environment, positive_int, set_threads  # noqa: E402
from fourm_fast.nn.few_rows import (FEW_ROWS_MAX, FEW_ROWS_MAX_HALF, FEW_ROWS_MIN, HALF_ROWS_MAX_K,  # noqa: E402
                                    HALF_ROWS_MIN_BYTES, ROWS_LINEAR_MIN_BYTES)
from fourm_fast.ops import rows_linear  # noqa: E402

SHAPES = [(384, 384), (1024, 384), (1152, 384), (384, 1024), (8192, 384), (30522, 384),
          (2304, 768), (2048, 768), (768, 2048), (30522, 768)]
ROWS = [1, 2, 4, 8, 12, 16, 32]
METHODS = {
    "linear": lambda x, w: F.linear(x, w),
    "swapped": lambda x, w: torch.mm(w, x.t()).t(),
    "rows_linear": rows_linear,
}


def stream_gbps(pool_mib: int) -> float:
    """Read bandwidth of this process's threads: best of three sums over a pool_mib tensor."""
    t = torch.ones(pool_mib * 2**20 // 4)
    t.sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best / 1e9


class ColdPool:
    """Copies of one weight taken round-robin across every method and cell, so a copy comes back
    only after the whole pool (--pool-mib, far beyond the last-level cache) has been read."""

    def __init__(self, n: int, k: int, pool_mib: int, g: torch.Generator, dtype: torch.dtype):
        copies = max(2, pool_mib * 2**20 // (n * k * dtype.itemsize))
        self.copies = [torch.randn(n, k, generator=g).to(dtype) for _ in range(copies)]
        self.cursor = 0

    def next(self) -> torch.Tensor:
        w = self.copies[self.cursor % len(self.copies)]
        self.cursor += 1
        return w


def median_cold_ms(fn, x, pool: ColdPool, calls: int) -> float:
    fn(x, pool.next())
    times = []
    for _ in range(calls):
        w = pool.next()
        start = time.perf_counter()
        fn(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--calls", type=positive_int, default=40, help="timed calls per method and cell")
    ap.add_argument("--pool-mib", type=positive_int, default=1024,
                    help="weight copies per shape fill this much memory (more than the last-level cache)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NxK", help="weights to measure (default: all of SHAPES)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
        except ValueError:
            ap.error(f"--shapes: write N x K as 2048x768, got {args.shapes}")
        if any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
            ap.error(f"--shapes: write N x K as 2048x768, got {args.shapes}")
    set_threads(args.threads)
    env = environment("cpu")
    dtype = getattr(torch, args.dtype)
    roof = stream_gbps(args.pool_mib)
    print(f"# x @ W.T, {args.dtype}, W cold, on {env['device_name']} ({torch.get_num_threads()} threads), sha "
          f"{env['git_sha']}; roofline (sum over {args.pool_mib} MiB) {roof:.1f} GB/s; few_rows takes rows_linear "
          + (f"for {FEW_ROWS_MIN}-{FEW_ROWS_MAX} rows and weights of {ROWS_LINEAR_MIN_BYTES >> 20} MiB or more"
             if dtype == torch.float32 else
             f"for 1-{FEW_ROWS_MAX_HALF} rows, weights of {HALF_ROWS_MIN_BYTES >> 10} KiB or more and K <= {HALF_ROWS_MAX_K}"))
    print(f"{'N':>6} {'K':>4} {'rows':>4}  " + "  ".join(f"{m + ' GB/s':>16}" for m in METHODS)
          + f"  {'rows_linear vs linear':>21}")
    g = torch.Generator().manual_seed(0)
    results = []
    for n, k in shapes:
        pool = ColdPool(n, k, args.pool_mib, g, dtype)
        gb = n * k * dtype.itemsize / 1e9
        for m in args.rows:
            x = torch.randn(m, k, generator=g).to(dtype)
            ms = {name: median_cold_ms(fn, x, pool, args.calls) for name, fn in METHODS.items()}
            cells = "  ".join(f"{gb / (t / 1e3):>16.1f}" for t in ms.values())
            ratio = ms["linear"] / ms["rows_linear"]
            print(f"{n:>6} {k:>4} {m:>4}  {cells}  {ratio:>20.2f}x", flush=True)
            for name, t in ms.items():
                results.append({"op": "linear_rows", "method": name, "dtype": args.dtype, "n": n, "k": k, "rows": m,
                                "median_ms": round(t, 4), "gbps": round(gb / (t / 1e3), 2),
                                "roofline_gbps": round(roof, 2), "vs_linear": round(ms["linear"] / t, 3),
                                "calls": args.calls, "weights": "cold"})
        del pool
    if not args.no_save:
        print(f"# appended {len(results)} rows to {append_results('linear_rows', results, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
