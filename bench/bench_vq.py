#!/usr/bin/env python
"""vq_lookup side by side with the nearest-code searches users would otherwise run.

Baselines: torch.cdist + argmin; 4M's quantizer expansion -(|x|^2 - 2 x c^T + |c|^2) + argmax
(optionally under torch.compile); faiss-cpu IndexFlatL2 when importable (CPU, l2); and, as the
roof, the bare GEMM x @ c^T of the same N x K x D (what the fused kernel must approach).

  python bench/bench_vq.py                      # full sweep at 4M sizes on the CPU
  python bench/bench_vq.py --quick              # two shapes: a smoke run (device_check.sh's CPU dry run)
  python bench/bench_vq.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.utils import append_results, environment, peak_memory_mib, positive_int, set_threads, time_fn, timing_dict  # noqa: E402
from fourm_fast.ops import vq_lookup  # noqa: E402
from fourm_fast.reference.vq import vq_lookup_4m, vq_lookup_cdist  # noqa: E402

FULL_ROWS = (16384, 65536)
FULL_SHAPES = ((1024, 32), (4096, 32), (8192, 32), (16384, 32), (16384, 256))
QUICK_ROWS = (16384,)
QUICK_SHAPES = ((1024, 32), (8192, 32))
# Dense-matrix peaks used for "% of roof" (GEMM-class work): measured or vendor figures.
GPU_PEAK_TFLOPS = {"float32": 67.0, "bfloat16": 790.0, "float16": 790.0}


def _faiss_search(cb: torch.Tensor, threads: int):
    try:
        import faiss  # type: ignore
    except ImportError:
        return None
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(cb.shape[1])
    index.add(cb.float().numpy())
    return lambda x: index.search(x.numpy(), 1)


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    ap.add_argument("--rows", type=lambda s: tuple(int(v) for v in s.split(",")), default=None, help="e.g. 16384,65536")
    ap.add_argument("--shapes", type=_parse_shapes, default=None, help="KxD list, e.g. 1024x32,16384x256")
    ap.add_argument("--quick", action="store_true", help="N=16384, K x D in {1024x32, 8192x32}")
    ap.add_argument("--repeats", type=positive_int, default=None, help="timed runs per method (default 5 CPU, 20 CUDA)")
    ap.add_argument("--threads", type=positive_int, default=None, help="CPU threads for every method")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of 4M's expansion")
    ap.add_argument("--max-baseline-gib", type=float, default=8.0, help="skip baselines whose N x K temporaries exceed this")
    ap.add_argument("--no-save", action="store_true", help="do not append to bench/results/vq.jsonl")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    repeats = args.repeats or (20 if device == "cuda" else 5)
    threads = torch.get_num_threads()
    env = environment(device)
    print(f"# vq_lookup benchmark on {env['device_name']} ({threads} CPU threads), dtype {args.dtype}, metric {args.metric}, sha {env['git_sha']}")
    header = f"{'N':>6} {'K':>6} {'D':>4}  {'method':<24} {'median ms':>10} {'p20-p80 ms':>17} {'GFLOP/s':>9} {'vs ours':>8} {'peak MiB':>9}"
    print(header)
    results = []
    for N in rows:
        for K, D in shapes:
            torch.manual_seed(0)
            x = torch.randn(N, D, device=device).to(dtype)
            cb = torch.randn(K, D, device=device).to(dtype)
            flops = 2.0 * N * K * D
            nk_gib = N * K * 4 / 2**30
            methods = {"fourm_fast": lambda: vq_lookup(x, cb, args.metric)}
            baseline_note = {}
            if args.metric == "l2":
                for name, fn, temporaries in (
                    ("torch.cdist+argmin", lambda: vq_lookup_cdist(x, cb), 1),
                    ("4m_expansion+argmax", lambda: vq_lookup_4m(x, cb), 3),
                ):
                    if nk_gib * temporaries > args.max_baseline_gib:
                        baseline_note[name] = f"skipped: needs ~{nk_gib * temporaries:.0f} GiB of N x K temporaries"
                    else:
                        methods[name] = fn
                if args.compile and nk_gib * 2 <= args.max_baseline_gib:
                    # a fresh, static compile per case, as bench_sampling / bench_attention: one cache
                    # shared by every case runs into Dynamo's recompile limit, past which it falls back
                    # to eager or goes dynamic unnoticed
                    torch._dynamo.reset()
                    compiled = torch.compile(vq_lookup_4m, dynamic=False)
                    methods["4m_expansion(compiled)"] = lambda: compiled(x, cb)
                if device == "cpu" and dtype == torch.float32:
                    search = _faiss_search(cb, threads)
                    if search is None:
                        baseline_note["faiss.IndexFlatL2"] = "skipped: faiss-cpu not installed (pip install faiss-cpu)"
                    else:
                        methods["faiss.IndexFlatL2"] = lambda: search(x)
            if nk_gib <= args.max_baseline_gib:
                methods["gemm_only(x@c.T)"] = lambda: x @ cb.T
            ours_ms = None
            for name, fn in methods.items():
                t = time_fn(fn, device, repeats=repeats, warmup=1, max_seconds=60)
                mem = peak_memory_mib(fn, device)
                if name == "fourm_fast":
                    ours_ms = t.median_ms
                ratio = t.median_ms / ours_ms
                gflops = flops / (t.median_ms * 1e-3) / 1e9
                row = {
                    "op": "vq_lookup", "method": name, "N": N, "K": K, "D": D, "dtype": args.dtype, "metric": args.metric,
                    **timing_dict(t), "gflops": round(gflops, 2), "time_vs_ours": round(ratio, 3),
                    "peak_mib": None if mem is None else round(mem, 1),
                }
                if device == "cuda":
                    row["pct_of_peak"] = round(100 * gflops / 1e3 / GPU_PEAK_TFLOPS[args.dtype], 1)
                results.append(row)
                mem_s = "n/a" if mem is None else f"{mem:.0f}"
                print(f"{N:>6} {K:>6} {D:>4}  {name:<24} {t.median_ms:>10.2f} {t.p20_ms:>8.2f}-{t.p80_ms:<8.2f} {gflops:>9.1f} {ratio:>7.2f}x {mem_s:>9}", flush=True)
            for name, note in baseline_note.items():
                print(f"{N:>6} {K:>6} {D:>4}  {name:<24} {note}")
    if not args.no_save:
        path = append_results("vq", results, env)
        print(f"# appended {len(results)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
