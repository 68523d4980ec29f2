#!/usr/bin/env python
"""Generation side by side with 4M's loop, same model, batch, schedule and settings.

Methods:
  fourm_fast      fourm_fast.generate.Generator: per-sample schedules, guided passes batched into one
                  forward, masked_attention, fused sample_tokens, key/value cache for sequences
  fourm_fast-nocache  the same with the cache off (autoregressive cases only): what the cache buys
  4m_reference    fourm_fast/reference/generate.py: 4M's GenerationSampler restated (dense masks,
                  eager attention, deep-copied unconditional pass run after the conditional one,
                  sort-based top-p sampling, the whole decoder re-run for every new token)

Model: the tiny preset (dim 384, 6 + 6 layers, 6 heads) with 4M's vocabularies (rgb 16384, depth
8192, caption and det 30522). Autoregressive runs go to the length cap (random weights never emit
the end sentinel): 32 tokens for caption (max_length 33), 96 for det (boxes as text are long).
Weights are random: speed does not depend on them. Tokens/s counts generated tokens (batch x
tokens per target).

With --count-flops each method also runs once under a FLOP counter (bench/flops.py): the GFLOP
column and the reference's count over ours ("flop ratio") show how much of a speedup comes from
executing less arithmetic; where the counts are equal, only a faster rate can win. On the CPU the
"ceiling" column bounds that rate: the reference's time over the time our FLOPs would take at the
measured sgemm rate (the fastest 1024^3 probe so far: one before the cases, one after each), i.e.
the speedup a run with every FLOP at that rate and no other cost would reach.

  python bench/bench_generate.py --quick
  python bench/bench_generate.py --batch 4 --repeats 3
  python bench/bench_generate.py --count-flops
  python bench/bench_generate.py --dtype bfloat16    # both methods on bf16 weights
  python bench/bench_generate.py --cases ar32 ar96   # a subset
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.flops import count_flops  # noqa: E402
from bench.utils import append_results, environment, positive_int, set_threads, time_cpu_interleaved, time_fn, timing_dict  # noqa: E402
from fourm_fast.generate import Generator, TargetSpec, build_chained_schedule  # noqa: E402
from fourm_fast.model import FourM, ModalityConfig, preset  # noqa: E402
from fourm_fast.reference.generate import empty_target, generate_4m, image_input, sequence_input  # noqa: E402
from fourm_fast.train.metrics import measured_cpu_tflops  # noqa: E402

AR_LEN = {"caption": 32, "det": 96}
SENTINELS = {n: [0] + list(range(30322, 30522)) for n in AR_LEN}


def build_model(device: str) -> FourM:
    mods = [ModalityConfig("rgb", "image", 16384, grid=14), ModalityConfig("depth", "image", 8192, grid=14),
            ModalityConfig("caption", "sequence", 30522, max_length=AR_LEN["caption"] + 1),
            ModalityConfig("det", "sequence", 30522, max_length=AR_LEN["det"] + 1)]
    torch.manual_seed(0)
    return FourM(preset("tiny", mods)).to(device).eval()


def cases(quick: bool) -> dict[str, tuple[str, list[TargetSpec]]]:
    """name -> (condition, targets). 4M-style settings: cosine MaskGIT with a linear temperature
    decay, ROAR with onex, guidance 3 on the condition, top-p 0.9."""
    c = {
        "caption->rgb maskgit8 cfg3": ("caption", [TargetSpec("rgb", "maskgit", 8, "cosine", 3.0, "linear", 3.0, top_p=0.9)]),
        "caption->rgb roar16 cfg3": ("caption", [TargetSpec("rgb", "roar", 16, "linear", 5.0, "onex:0.5:0.5", 3.0, top_p=0.9)]),
        "rgb->caption ar32": ("rgb", [TargetSpec("caption", "autoregressive", temperature=0.7, top_p=0.9)]),
        "rgb->caption ar32 cfg3": ("rgb", [TargetSpec("caption", "autoregressive", temperature=0.7, cfg_scale=3.0, top_p=0.9)]),
        "rgb->det ar96": ("rgb", [TargetSpec("det", "autoregressive", temperature=0.7, top_p=0.9)]),
        "caption->rgb->depth chain": ("caption", [TargetSpec("rgb", "maskgit", 8, "cosine", 3.0, "linear", 3.0, top_p=0.9),
                                                 TargetSpec("depth", "maskgit", 8, "cosine", 1.0, "constant", 1.0, top_p=0.9)]),
    }
    if quick:
        return {k: c[k] for k in ("caption->rgb maskgit8 cfg3", "rgb->caption ar32 cfg3")}
    return c


def generated_tokens(model, targets: list[TargetSpec], B: int) -> int:
    n = 0
    for t in targets:
        m = model.cfg.modality(t.name)
        n += m.num_tokens if m.kind == "image" else AR_LEN[t.name]
    return B * n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's weights for every method (bfloat16: both run bf16 GEMMs, AMX on CPUs with it)")
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--quick", action="store_true", help="two cases, batch 2, one repeat")
    ap.add_argument("--cases", nargs="+", default=None, metavar="SUBSTR",
                    help="only the cases whose name contains one of these (e.g. ar32 chain)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-max-seconds", type=float, default=120.0,
                    help="wall-time cap on the reference, its warm-up run included: past it no new timed run "
                         "(CPU: round of every method) starts; it always gets one warm-up and one timed run")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--count-flops", action="store_true", help="also count each method's executed FLOPs (one extra run each)")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    B = 2 if args.quick else args.batch
    repeats = 1 if args.quick else args.repeats
    dev = args.device
    model = build_model(dev).to(getattr(torch, args.dtype))
    env = environment(dev)
    g_ids = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 16384, (B, 196), generator=g_ids)
    caption = torch.randint(300, 30000, (B, 12), generator=g_ids)
    caption[:, -1] = 3  # [EOS]
    print(f"# generation, tiny preset, {args.dtype}, batch {B}, on {env['device_name']} ({torch.get_num_threads()} CPU threads), sha {env['git_sha']}")
    # the ceiling is against the fp32 sgemm rate: float32 runs only
    ceiling = args.count_flops and dev == "cpu" and not args.no_reference and args.dtype == "float32"
    sgemm_tflops = measured_cpu_tflops() if ceiling else None
    flop_head = f" {'GFLOP':>8} {'flop ratio':>10}" if args.count_flops else ""
    flop_head += f" {'ceiling':>8}" if ceiling else ""
    print(f"{'case':<28} {'method':<20} {'median s':>9} {'p20-p80 s':>15} {'tokens/s':>9} {'vs 4M':>7}{flop_head}")
    rows = []
    chosen = {n: c for n, c in cases(args.quick).items() if not args.cases or any(p in n for p in args.cases)}
    if not chosen:
        ap.error(f"--cases {args.cases}: no case matches; the cases are {list(cases(args.quick))}")
    for case, (cond, targets) in chosen.items():
        n_gen = generated_tokens(model, targets, B)
        ar = any(t.scheme == "autoregressive" for t in targets)

        def ours(use_cache=True):
            g = Generator(model, SENTINELS, use_cache=use_cache)
            st = g.new_state(B)
            if cond == "rgb":
                st.set_image("rgb", rgb.to(dev))
            else:
                st.set_sequence("caption", caption.tolist())
            return g.generate(st, targets, seed=0)

        def reference():
            md = {"rgb": image_input(rgb)} if cond == "rgb" else {"caption": sequence_input(caption)}
            for t in targets:
                md[t.name] = empty_target(model, t.name, B, SENTINELS)
            schedule = build_chained_schedule([cond], targets, [196 if t.scheme != "autoregressive" else 0 for t in targets],
                                              cfg_grow_conditioning=True)
            return generate_4m(model, md, schedule, SENTINELS, top_p=0.9, seed=0)

        methods = {"fourm_fast": ours}
        if ar:
            methods["fourm_fast-nocache"] = lambda: ours(False)
        if not args.no_reference:
            methods["4m_reference"] = reference
        flops = {name: count_flops(fn) for name, fn in methods.items()} if args.count_flops else {}
        # one warm-up run of every method, the reference's too, so first-call costs (allocator
        # growth, lazy init) stay out of every median; the reference's cap counts its warm-up
        warm_s = {}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            warm_s[name] = time.perf_counter() - t0
        ref_cap = max(0.0, args.reference_max_seconds - warm_s["4m_reference"]) if "4m_reference" in methods else None
        if dev == "cpu":  # interleaved rounds: the VM's drift costs every method alike
            times = time_cpu_interleaved(methods, repeats, max_seconds=ref_cap)
        else:
            times = {name: time_fn(fn, dev, repeats=repeats, warmup=0, max_seconds=ref_cap if name == "4m_reference" else None)
                     for name, fn in methods.items()}
        for name in methods:
            t = times[name]
            tps = n_gen / (t.median_ms * 1e-3)
            rows.append({"op": "generate", "case": case, "method": name, "batch": B, "dtype": args.dtype, "generated_tokens": n_gen,
                         **timing_dict(t), "tokens_per_s": round(tps, 2), "interleaved": dev == "cpu"})
            if name in flops:
                rows[-1]["gflop"] = round(flops[name] / 1e9, 3)
        ref = times.get("4m_reference")
        if ceiling:
            sgemm_tflops = max(sgemm_tflops, measured_cpu_tflops())
        for row in rows[-len(methods):]:
            t = times[row["method"]]
            ratio = ref.median_ms / t.median_ms if ref else None
            row["speedup_vs_4m"] = round(ratio, 3) if ratio else None
            flop_cols = ""
            if flops:
                fr = flops["4m_reference"] / flops[row["method"]] if "4m_reference" in flops and flops[row["method"]] else None
                row["flop_ratio_vs_4m"] = round(fr, 3) if fr else None
                flop_cols = f" {flops[row['method']] / 1e9:>8.1f} {(f'{fr:.2f}x' if fr else '-'):>10}"
                if ceiling and row["method"] != "4m_reference" and flops[row["method"]]:
                    bound = ref.median_ms * 1e-3 / (flops[row["method"]] / (sgemm_tflops * 1e12))
                    row["speedup_ceiling"] = round(bound, 2)
                    row["sgemm_tflops"] = round(sgemm_tflops, 4)
                    flop_cols += f" {bound:>7.2f}x"
            print(f"{case:<28} {row['method']:<20} {t.median_ms / 1e3:>9.2f} {t.p20_ms / 1e3:>7.2f}-{t.p80_ms / 1e3:<7.2f} "
                  f"{row['tokens_per_s']:>9.1f} {(f'{ratio:.2f}x' if ratio else '-'):>7}{flop_cols}", flush=True)
    if not args.no_save:
        print(f"# appended {len(rows)} rows to {append_results('generate', rows, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
