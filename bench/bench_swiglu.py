#!/usr/bin/env python
"""silu(gate) * up, the gate of 4M's SwiGLU MLP: fourm_fast.ops.swiglu against the eager
``F.silu(gate) * up`` that ml-4m runs (and, with --compile, that expression under torch.compile),
forward alone and forward + backward (autograd, a given output gradient), at 4M's MLP shapes.

Reported: median time, ratio to ours, and GB/s of the op's own traffic (forward: gate and up read,
out written; backward: grad, gate and up read, two gradients written; eager moves more than this,
so its GB/s says how far it is from the op's roof, not what it moved). The roof is measured on the
CPU (a copy of a 256 MiB tensor, read + write, on the same threads); on a GPU it is the lent
machines' measured HBM bandwidth (shared/STYLE.md). On the CPU the 1024 x 1024 and 2048 x 1024
tensors (4-8 MiB each) partly stay in the last-level cache, so the op can pass the DRAM roof.

  python bench/bench_swiglu.py                      # CPU, float32 and bfloat16
  python bench/bench_swiglu.py --device cuda --compile
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.utils import (append_results, environment, positive_int, set_threads, time_cpu_interleaved, time_fn,  # noqa: E402
                         timing_dict)
from fourm_fast.ops import swiglu  # noqa: E402
from fourm_fast.reference.swiglu import swiglu_eager  # noqa: E402

# (rows, hidden): tiny (dim 384 -> hidden 1024) at batch 8 x 128 and 8 x 256 tokens; base (dim
# 768 -> 2048) at 64 x 128 tokens, the GPU training shape.
CPU_SHAPES = ((8 * 128, 1024), (8 * 256, 1024))
GPU_SHAPES = ((8 * 128, 1024), (64 * 128, 2048), (64 * 256, 2048))
HBM_TBPS = {"H100": 3.0, "H200": 4.3}


def copy_gbps(device: str) -> float:
    """Read + write bandwidth of a 256 MiB copy: the best of three, after one warm-up copy."""
    src = torch.ones(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def roof_gbps(device: str, name: str) -> tuple[float, str]:
    if device == "cuda":
        for key, tbps in HBM_TBPS.items():
            if key in name:
                return tbps * 1e3, f"{key} measured HBM"
    return copy_gbps(device), "measured copy"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--compile", action="store_true", help="also time the eager expression under torch.compile")
    ap.add_argument("--repeats", type=positive_int, default=None)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    dtypes = []
    for name in args.dtypes.split(","):
        if name not in ("float32", "bfloat16", "float16"):
            ap.error(f"--dtypes: {name!r} is not one of float32, bfloat16, float16")
        dtypes.append(name)
    repeats = args.repeats or (50 if device == "cuda" else 20)
    env = environment(device)
    roof, roof_note = roof_gbps(device, env["device_name"])
    print(f"# swiglu on {env['device_name']} ({torch.get_num_threads()} CPU threads), roof {roof:.1f} GB/s "
          f"({roof_note}), sha {env['git_sha']}")
    print(f"{'rows':>6} {'hidden':>6} {'dtype':>9} {'pass':>8}  {'method':<18} {'median ms':>10} {'p20-p80 ms':>19} "
          f"{'vs ours':>8} {'GB/s':>8} {'% roof':>7}")
    rows = []
    for R, H in GPU_SHAPES if device == "cuda" else CPU_SHAPES:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            g = torch.Generator(device=device).manual_seed(0)
            a = (torch.randn(R, H, device=device, generator=g) * 3).to(dtype).requires_grad_()
            b = torch.randn(R, H, device=device, generator=g).to(dtype).requires_grad_()
            grad = torch.randn(R, H, device=device, generator=g).to(dtype)
            fns = {"fourm_fast": swiglu, "eager": swiglu_eager}
            if args.compile:
                # a fresh, static compile per case: a shared one would reach Dynamo's recompile
                # limit over the cases and then quietly run eager
                torch._dynamo.reset()
                fns["eager+compile"] = torch.compile(swiglu_eager, dynamic=False)
            elem = a.element_size() * R * H
            for pass_name, nbytes in (("fwd", 3 * elem), ("fwd+bwd", 8 * elem)):
                runs = {}
                for name, fn in fns.items():
                    if pass_name == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                return fn(a, b)
                    else:
                        def run(fn=fn):
                            return torch.autograd.grad(fn(a, b), (a, b), grad)
                    runs[name] = run
                if device == "cpu":  # interleaved: a slow spell of the VM costs every method alike
                    for run in runs.values():
                        run(), run()
                    timings = time_cpu_interleaved(runs, repeats)
                else:
                    timings = {name: time_fn(run, device, repeats=repeats, warmup=2) for name, run in runs.items()}
                ours = timings["fourm_fast"].median_ms
                for name, t in timings.items():
                    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                    rows.append({"op": "swiglu", "method": name, "rows": R, "hidden": H, "dtype": dtype_name,
                                 "pass": pass_name, **timing_dict(t), "time_vs_ours": round(t.median_ms / ours, 3),
                                 "gbps": round(gbps, 2), "roof_gbps": round(roof, 1), "roof_note": roof_note,
                                 "pct_of_roof": round(100 * gbps / roof, 1), "interleaved": device == "cpu"})
                    print(f"{R:>6} {H:>6} {dtype_name:>9} {pass_name:>8}  {name:<18} {t.median_ms:>10.3f} "
                          f"{t.p20_ms:>9.3f}-{t.p80_ms:<9.3f} {t.median_ms / ours:>7.2f}x {gbps:>8.1f} "
                          f"{100 * gbps / roof:>6.1f}%", flush=True)
    if not args.no_save:
        print(f"# appended {len(rows)} rows to {append_results('swiglu', rows, env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
