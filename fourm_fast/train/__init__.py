"""`fourm-fast train`: the trainer (config, synthetic source, checkpoints, DDP/FSDP2)."""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config, e.g. configs/tiny.yaml; without one the built-in defaults of "
                                    "fourm_fast/train/config.py apply (not tiny.yaml's); a lone "
                                    "positional *.yaml / *.yml file is taken as the config too")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4 (before or after the flags)")
    p.add_argument("--steps", type=int, help="total steps (train.steps)")
    p.add_argument("--out", help="output folder: metrics.csv, checkpoints/, tensorboard/")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue from the latest checkpoint in --out when there is one, else start fresh "
                             "(one command line for restarts: torchrun --max-restarts, requeued jobs)")
    p.add_argument("--stop-after", type=int, help="stop after this step with a checkpoint (train.stop_after)")
    p.add_argument("--skip-bad", action="store_true",
                   help="shards: leave out and count samples with bad token rows instead of stopping (data.skip_bad)")


def take_extra_overrides(args: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser) -> None:
    """argparse fills a positional list once: ``key=value`` items after a flag come back from
    parse_known_args as extras. Those join the overrides; anything else is an error."""
    bad = [e for e in extra if e.startswith("-") or ("=" not in e and not e.endswith((".yaml", ".yml")))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(args.overrides) + extra


def _config_path(args: argparse.Namespace) -> str | None:
    """--config, or a positional YAML file among the overrides (``fourm-fast train CONFIG.yaml``)."""
    files = [o for o in args.overrides if "=" not in o and o.endswith((".yaml", ".yml"))]
    if not files:
        return args.config
    given = ([f"--config {args.config}"] if args.config is not None else []) + files
    if len(given) > 1:
        raise ConfigError(f"one config file at most, got {', '.join(given)}")
    args.overrides = [o for o in args.overrides if o != files[0]]
    return files[0]


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
    rc = _run(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under FSDP2, torch's DTensor state keeps the process group, and gloo's threads, alive past
        # train(); joined during interpreter finalization, such a thread can abort a finished run
        # ("terminate called without an active exception", seen once with DDP before its group was
        # torn down in train()). Files are closed and there is nothing left to do: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(args: argparse.Namespace) -> int:
    from ..data.shards import ShardError
    from .checkpoint import CheckpointError
    from .trainer import TrainingDiverged, train

    try:
        config = _config_path(args)
        overrides = overrides_from_args(args)
        cfg = load_config(config, overrides)
        resume = "auto" if getattr(args, "auto_resume", False) else args.resume
        result = train(cfg, resume=resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, CheckpointError, ShardError, OSError) as e:  # OSError: an unwritable --out, a full disk
        print(f"fourm-fast train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"fourm-fast train: {e}", file=sys.stderr)
        return 1
    last = result["last"]
    if last and result["rank"] == 0:
        print(f"done: {result['steps']} steps, loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s; "
              f"metrics in {result['out']}/metrics.csv", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fourm_fast.train", description="Train FourM (also under torchrun).")
    add_arguments(p)
    args, extra = p.parse_known_args(argv)
    take_extra_overrides(args, extra, p)
    return run(args)
