"""`fourm-fast train`: the trainer (config, synthetic source, checkpoints, DDP/FSDP2)."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/tiny.yaml); defaults when omitted")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--steps", type=int, help="total steps (train.steps)")
    p.add_argument("--out", help="output folder: metrics.csv, checkpoints/, tensorboard/")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-after", type=int, help="stop after this step with a checkpoint (train.stop_after)")
    p.add_argument("--skip-bad", action="store_true",
                   help="shards: leave out and count samples with bad token rows instead of stopping (data.skip_bad)")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The positional overrides plus those the flags stand for."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.stop_after is not None:
        overrides.append(f"train.stop_after={args.stop_after}")
    if args.out is not None:
        overrides.append(f"out={args.out}")
    if getattr(args, "skip_bad", False):
        overrides.append("data.skip_bad=true")
    return overrides


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .trainer import train

    overrides = overrides_from_args(args)
    try:
        cfg = load_config(args.config, overrides)
        result = train(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"fourm-fast train: error: {e}", file=sys.stderr)
        return 2
    last = result["last"]
    if last and result["rank"] == 0:
        print(f"done: {result['steps']} steps, loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s; "
              f"metrics in {result['out']}/metrics.csv", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fourm_fast.train", description="Train FourM (also under torchrun).")
    add_arguments(p)
    return run(p.parse_args(argv))
