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
    except (ValueError, OSError) as e:  # OSError: --out is a file, unwritable, the disk is full
        print(f"fourm-fast data synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['num_samples']} scenes ({', '.join(m['modalities'])}) at {m['size']} px to {args.out}", file=sys.stderr)
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data import ShardError
    from .tokenizers.vq import train_text_tokenizer, train_tokenizer

    try:
        vq_only = {"--steps": args.steps, "--batch-size": args.batch_size, "--num-codes": args.num_codes}
        if args.modality == "text":
            given = [k for k, v in vq_only.items() if v is not None]
            if given:  # WordPiece has none of them; they used to be dropped without a word
                raise ValueError(f"{', '.join(given)}: VQ tokenizer settings; the text tokenizer takes --out only")
            train_text_tokenizer(args.data, out=args.out, log=_log)
            return 0
        train_tokenizer(args.data, args.modality, **{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                                                       ("num_codes", args.num_codes)) if v is not None},
                        out=args.out, log=_log)
    except (ValueError, ShardError, OSError) as e:
        print(f"fourm-fast tokenizer train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .data import ShardError
    from .tokenizers.vq import tokenize_shards

    try:
        tokenize_shards(args.data, log=_log)
    except (ValueError, ShardError, OSError) as e:
        print(f"fourm-fast tokenize: error: {e}", file=sys.stderr)
        return 2
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
    p_tok = sub.add_parser("tokenizer", help="tokenizers: VQ for image modalities, WordPiece for text")
    tok_sub = p_tok.add_subparsers(dest="tokenizer_command", required=True)
    p_tt = tok_sub.add_parser("train", help="train a shard folder's tokenizer: VQ for an image modality, WordPiece for --modality text")
    p_tt.add_argument("--data", required=True, help="shard folder (fourm-fast data synth)")
    p_tt.add_argument("--modality", required=True, help="rgb, depth, normal, semseg, edges, or text (WordPiece over caption + det)")
    p_tt.add_argument("--steps", type=int, help="VQ: training steps (default 300)")
    p_tt.add_argument("--batch-size", type=int, help="VQ: images per step (default 32)")
    p_tt.add_argument("--num-codes", type=int, help="VQ: codebook size (default 256)")
    p_tt.add_argument("--out", help="output file (default DATA/tokenizers/MODALITY.safetensors, or text.json)")
    p_tt.set_defaults(func=_cmd_tokenizer_train)
    p_tk = sub.add_parser("tokenize", help="token grids for every modality with a trained tokenizer")
    p_tk.add_argument("data", help="shard folder")
    p_tk.set_defaults(func=_cmd_tokenize)
    p_gen = sub.add_parser("generate", help="any-to-any generation from a training checkpoint")
    from .generate.cli import add_arguments as add_generate_arguments, run as run_generate

    add_generate_arguments(p_gen)
    p_gen.set_defaults(func=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and args.command == "train":  # key=value overrides after a flag (see take_extra_overrides)
        from .train import take_extra_overrides

        take_extra_overrides(args, extra, parser)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)
