#!/usr/bin/env python
"""The trainer end to end on one device: throughput of a short run, and exact resume.

Three runs of `fourm_fast.train.train` from the shipped configs/tiny.yaml with overrides: N steps
straight; N/2 steps that stop with a checkpoint; a resume of the latter to N. The resumed run's
rows must equal the straight run's digit for digit (loss, lr, grad_norm), as tests/test_train.py
checks on the CPU; on a GPU this covers bf16 autocast and fused AdamW too. Prints the straight
run's median tokens/s and MFU and appends one row to bench/results/train_run.jsonl.

  python bench/train_run_check.py --device cuda --preset B --batch 64 --steps 40
  python bench/train_run_check.py --quick            # CPU smoke run
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.utils import append_results, environment, positive_int  # noqa: E402
from fourm_fast.train.config import load_config  # noqa: E402
from fourm_fast.train.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "lr", "grad_norm")


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--steps", type=positive_int, default=20)
    ap.add_argument("--quick", action="store_true", help="a 2-block dim-64 model, 6 steps")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    steps = 6 if args.quick else args.steps
    if steps < 2 or steps % 2:
        ap.error("--steps must be even and >= 2")
    overrides = [f"model.preset={args.preset}", f"train.batch_size={args.batch}", f"train.device={args.device}",
                 f"checkpoint.every={steps}", "log.tensorboard=false", "log.progress=false"]
    if args.quick:
        overrides.append("model.overrides={dim: 64, encoder_depth: 1, decoder_depth: 1, num_heads: 2}")
    quiet = lambda message: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, *extra: str, resume: bool = False) -> list[dict]:
            cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides + [f"out={Path(tmp) / name}"] + list(extra))
            train(cfg, resume=resume, log=quiet)
            return _rows(Path(tmp) / name)

        straight = run("straight", f"train.steps={steps}")
        run("resumed", f"train.steps={steps}", f"train.stop_after={steps // 2}")
        resumed = run("resumed", f"train.steps={steps}", resume=True)
    mismatches = [(a["step"], k) for a, b in zip(straight, resumed) for k in COMPARED if a[k] != b[k]]
    exact = len(straight) == len(resumed) == steps and not mismatches
    later = straight[1:]  # the first step pays for warm-up (allocator, kernels, autotuning)
    tps = statistics.median(float(r["tokens_per_s"]) for r in later)
    mfu = statistics.median(float(r["mfu"]) for r in later) if later[0].get("mfu") else None
    env = environment(args.device)
    print(f"# trainer on {env['device_name']}: preset {args.preset}{' (quick)' if args.quick else ''}, batch {args.batch}, "
          f"{steps} steps, sha {env['git_sha']}")
    print(f"median tokens/s {tps:,.0f}" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
          + f", loss {float(straight[0]['loss']):.4f} -> {float(straight[-1]['loss']):.4f}")
    print(f"resume after {steps // 2} steps: {'bit-exact' if exact else f'DIFFERS at {mismatches[:5]}'}")
    if not args.no_save:
        row = {"op": "train_run", "preset": args.preset, "quick": args.quick, "batch": args.batch, "steps": steps,
               "tokens_per_s": round(tps, 1), "mfu": None if mfu is None else round(mfu, 4),
               "first_loss": float(straight[0]["loss"]), "last_loss": float(straight[-1]["loss"]), "resume_exact": exact}
        print(f"# appended 1 row to {append_results('train_run', [row], env)}")
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
