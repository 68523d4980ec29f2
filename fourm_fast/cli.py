"""The `fourm-fast` command (also `python -m fourm_fast`)."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import info

    info(print_out=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
