"""The `fourm-fast` command (also `python -m fourm_fast`)."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import info

    info(print_out=True)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data import write_synthetic

    try:
        m = write_synthetic(args.out, args.n, args.size, args.seed)
    except ValueError as e:
        print(f"fourm-fast data synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['num_samples']} scenes ({', '.join(m['modalities'])}) at {m['size']} px to {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourm-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, compiled kernels, GPUs, optional backends")
    p_info.set_defaults(func=_cmd_info)
    p_train = sub.add_parser("train", help="train FourM from a YAML config (see configs/tiny.yaml)")
    from .train import add_arguments, run

    add_arguments(p_train)
    p_train.set_defaults(func=run)
    p_data = sub.add_parser("data", help="data tools")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_synth = data_sub.add_parser("synth", help="render the synthetic world into shards")
    p_synth.add_argument("--out", required=True, help="output folder (gets manifest.json)")
    p_synth.add_argument("--n", type=int, required=True, help="number of scenes")
    p_synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    p_synth.add_argument("--seed", type=int, default=0)
    p_synth.set_defaults(func=_cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
