#!/usr/bin/env python
"""sample_tokens side by side with 4M's sampling step (sort-based top-k/top-p + multinomial).

Methods: fourm_fast.ops.sample_tokens; the restatement of 4M's path in
fourm_fast/reference/sampling.py (guidance, full sort for top-p, softmax / T, torch.multinomial);
optionally torch.compile of that path. Reported: median time, ratio to fourm_fast, and on CUDA
the achieved bandwidth (logits read once, twice with CFG, plus outputs) against the HBM roof.

  python bench/bench_sampling.py --quick
  python bench/bench_sampling.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.utils import append_results, environment, positive_int, set_threads, time_fn, timing_dict  # noqa: E402
from fourm_fast.ops import sample_tokens  # noqa: E402
from fourm_fast.reference.sampling import sample_tokens_4m  # noqa: E402

FULL_SHAPES = ((64 * 196, 16384), (64 * 256, 8192), (64, 30000), (4096, 30000))
QUICK_SHAPES = ((64, 30000), (1024, 16384))
# Measured device-to-device bandwidth (read + write) of the lent machines (shared/STYLE.md).
HBM_TBPS = {"H100": 3.0, "H200": 4.3}


def _hbm_roof(name: str) -> float | None:
    for key, tbps in HBM_TBPS.items():
        if key in name:
            return tbps
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="two small shapes, fp32, no CFG variant")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=positive_int, default=None)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of 4M's path")
    ap.add_argument("--reference-max-seconds", type=float, default=60.0, help="stop repeating a slow baseline after this")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    dtypes = ["float32"] if args.quick else args.dtypes.split(",")
    cfgs = (False,) if args.quick else (False, True)
    repeats = args.repeats or (20 if device == "cuda" else 3)
    env = environment(device)
    roof = _hbm_roof(env["device_name"]) if device == "cuda" else None
    print(f"# sample_tokens benchmark on {env['device_name']} ({torch.get_num_threads()} CPU threads), top_p={args.top_p}, T={args.temperature}, sha {env['git_sha']}")
    print(f"{'R':>6} {'V':>6} {'dtype':>9} {'cfg':>4}  {'method':<22} {'median ms':>10} {'p20-p80 ms':>19} {'vs ours':>8} {'GB/s':>8}")
    rows = []
    for R, V in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for cfg in cfgs:
                torch.manual_seed(0)
                logits = (torch.randn(R, V, device=device) * 2).to(dtype)
                uncond = (torch.randn(R, V, device=device) * 2).to(dtype) if cfg else None
                scale = 2.0 if cfg else 1.0
                seed = torch.tensor(0, device=device)
                methods = {
                    "fourm_fast": lambda: sample_tokens(logits, temperature=args.temperature, top_p=args.top_p,
                                                        uncond_logits=uncond, cfg_scale=scale, seed=seed),
                    "4m_reference": lambda: sample_tokens_4m(logits, args.temperature, 0, args.top_p, uncond, scale),
                }
                if args.compile:
                    # a fresh, static compile per case: one cache shared by every case runs into
                    # Dynamo's recompile limit (8), past which it falls back to eager or goes dynamic
                    # unnoticed. time_fn's warm-up run does the compile, outside the timed runs.
                    torch._dynamo.reset()
                    compiled = torch.compile(sample_tokens_4m, dynamic=False)
                    methods["4m_reference(compiled)"] = lambda: compiled(logits, args.temperature, 0, args.top_p, uncond, scale)
                bytes_moved = R * V * logits.element_size() * (2 if cfg else 1) + R * 12
                ours = None
                for name, fn in methods.items():
                    t = time_fn(fn, device, repeats=repeats, warmup=1, max_seconds=None if name == "fourm_fast" else args.reference_max_seconds)
                    ours = t.median_ms if name == "fourm_fast" else ours
                    gbps = bytes_moved / (t.median_ms * 1e-3) / 1e9
                    row = {"op": "sample_tokens", "method": name, "R": R, "V": V, "dtype": dtype_name, "cfg": cfg,
                           "top_p": args.top_p, "temperature": args.temperature, **timing_dict(t),
                           "time_vs_ours": round(t.median_ms / ours, 3), "gbps": round(gbps, 2)}
                    if roof:
                        row["pct_of_hbm"] = round(100 * gbps / (roof * 1e3), 1)
                    rows.append(row)
                    print(f"{R:>6} {V:>6} {dtype_name:>9} {str(cfg):>4}  {name:<22} {t.median_ms:>10.2f} {t.p20_ms:>9.2f}-{t.p80_ms:<9.2f} {t.median_ms / ours:>7.2f}x {gbps:>8.1f}", flush=True)
    if not args.no_save:
        print(f"# appended {len(rows)} rows to {append_results('sampling', rows, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
