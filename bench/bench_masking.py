#!/usr/bin/env python
"""Token-budget sampler side by side with 4M's per-sample masking, one batch at a time.

Methods (same modality set, token counts and realistic sequence lengths):
  fourm_fast          TokenBudgetSampler.sample: budgets, span masks, gather layout
  fourm_fast+ml4m     the same plus to_ml4m_batch (4M's batch format, drop-in for ml-4m trainers)
  4m_reference        fourm_fast/reference/masking.py: 4M's UnifiedMasking restated, one call per
                      sample as dataloader workers run it (Dirichlet draws, argsort per image
                      modality, Python span masking)
The 4M-7 set: five 196-token image modalities + caption (lengths 8..40) + boxes as text (8..120).

  python bench/bench_masking.py --quick
  python bench/bench_masking.py --device cuda     # GPU budgets + layout (span masks stay on CPU)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.utils import append_results, environment, positive_int, positive_int_list, set_threads, time_fn, timing_dict  # noqa: E402
from fourm_fast.masking import FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG, fourm7_sampler, fourm7_specs, to_ml4m_batch  # noqa: E402
from fourm_fast.ops.masking import token_layout  # noqa: E402
from fourm_fast.reference.masking import mask_sample_4m  # noqa: E402

SENTINELS = list(range(30000, 30200))
PAD = 0
IMAGES = ("rgb", "depth", "normal", "semseg", "clip")


def make_batch(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = {n: torch.randint(0, 8192, (B, 196), generator=g) for n in IMAGES}
    lengths = {"caption": torch.randint(8, 41, (B,), generator=g), "det": torch.randint(8, 121, (B,), generator=g)}
    tokens["caption"] = torch.randint(300, 30000, (B, 256), generator=g)
    tokens["det"] = torch.randint(300, 30000, (B, 256), generator=g)
    return tokens, lengths


def reference_batch(B, tokens, lengths, n_tokens):
    specs = fourm7_specs()
    names = [s.name for s in specs]
    a_in = [FOURM7_ALPHAS_IN[n] for n in names]
    a_tg = [FOURM7_ALPHAS_TG[n] for n in names]
    out = []
    for b in range(B):
        sample = {n: tokens[n][b] for n in IMAGES}
        sample["caption"] = tokens["caption"][b, :int(lengths["caption"][b])].tolist()
        sample["det"] = tokens["det"][b, :int(lengths["det"][b])].tolist()
        out.append(mask_sample_4m(specs, a_in, a_tg, (n_tokens, n_tokens), (n_tokens, n_tokens), sample, SENTINELS, PAD))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="batch 256 at 128/128 only")
    ap.add_argument("--batches", type=positive_int_list, default=[256, 4096])
    ap.add_argument("--tokens", type=positive_int_list, default=[128, 256])
    ap.add_argument("--repeats", type=positive_int, default=None)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-max-seconds", type=float, default=30.0, help="stop repeating the slow baseline after this")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    batches = [256] if args.quick else args.batches
    token_counts = [128] if args.quick else args.tokens
    if device == "cuda" and not args.quick:
        batches = sorted(set(batches + [8192]))
    repeats = args.repeats or (20 if device == "cuda" else 5)
    env = environment(device)
    print(f"# token-budget sampler on {env['device_name']} ({torch.get_num_threads()} CPU threads), 4M-7 modalities, sha {env['git_sha']}")
    # "vs layout": time over fourm_fast (budgets, span masks, layout only); "vs +ml4m": over
    # fourm_fast+ml4m, which builds the same per-sample tensors as the reference (its like-for-like)
    print(f"{'B':>6} {'tokens':>7}  {'method':<22} {'median ms':>10} {'p20-p80 ms':>19} {'vs layout':>9} {'vs +ml4m':>9} {'samples/s':>11}")
    rows = []
    for n_tokens in token_counts:
        sampler = fourm7_sampler(n_tokens, device=device)
        for B in batches:
            tokens, lengths = make_batch(B)
            step = iter(range(10**9))
            methods = {
                "fourm_fast": lambda: sampler.sample(B, seed=next(step), lengths=lengths),
                "fourm_fast+ml4m": lambda: to_ml4m_batch(sampler.sample(B, seed=next(step), lengths=lengths), tokens, SENTINELS, PAD),
            }
            if device == "cuda":
                # the GPU part alone: budgets and image-token layout (sequences left empty)
                def gpu_ops():
                    b = sampler.budgets(B, seed=next(step))
                    z = torch.zeros_like(b.input)
                    return token_layout(b.input, b.target, z, z, sampler.size, sampler.is_image, n_tokens, n_tokens, 0)
                methods["fourm_fast(gpu ops)"] = gpu_ops
            if not args.no_reference and device == "cpu":
                methods["4m_reference"] = lambda: reference_batch(B, tokens, lengths, n_tokens)
            times = {}
            for name, fn in methods.items():
                slow = name == "4m_reference"
                # the reference gets a warm-up too (first-call costs out of its runs), and 2 timed runs
                times[name] = time_fn(fn, device, repeats=2 if slow else repeats, warmup=1,
                                      max_seconds=args.reference_max_seconds if slow else None)
            ours, ml4m = times["fourm_fast"].median_ms, times["fourm_fast+ml4m"].median_ms
            for name, t in times.items():
                rate = B / (t.median_ms * 1e-3)
                rows.append({"op": "token_budget_sampler", "method": name, "batch": B, "tokens_in": n_tokens,
                             "tokens_tg": n_tokens, **timing_dict(t), "time_vs_ours": round(t.median_ms / ours, 3),
                             "time_vs_ours_ml4m": round(t.median_ms / ml4m, 3), "samples_per_s": round(rate, 1)})
                print(f"{B:>6} {n_tokens:>7}  {name:<22} {t.median_ms:>10.2f} {t.p20_ms:>9.2f}-{t.p80_ms:<9.2f} "
                      f"{t.median_ms / ours:>8.2f}x {t.median_ms / ml4m:>8.2f}x {rate:>11.0f}", flush=True)
    if not args.no_save:
        print(f"# appended {len(rows)} rows to {append_results('masking', rows, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
