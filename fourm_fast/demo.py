"""`make demo`: synthetic world -> tokenizers -> tokenize -> a short 4M training run -> any-to-any
generation from fresh scenes.

Everything goes under --out (default demo_out/); summary.json lists what each stage produced, with
losses, tokenizer quality and timings, and samples.png shows the generations: one row per
condition set (the given modalities, decoded, then the generated targets). About 3 minutes on 2
CPU cores (tokenizers 70 s, 400 training steps 70 s): image -> depth / semseg / caption come out
recognisably scene-shaped; caption -> images mostly gets the background.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# (given modalities, targets) per row of samples.png
ROWS = [
    (["caption"], ["semseg", "depth", "rgb"]),
    (["rgb"], ["depth", "normal", "semseg", "caption"]),
    (["depth", "caption"], ["rgb", "normal"]),
]


def generate_samples(run: Path, data: Path, out: Path, size: int) -> dict:
    """Condition on modalities of scenes the model never saw (seed 1) and write out/samples.png."""
    from .data.synthetic import make_sample
    from .generate import Generator, TargetSpec
    from .generate.cli import Assets
    from .generate.render import render_grid
    from .tokenizers.vq import to_input

    assets = Assets(run, data / "tokenizers")
    gen = Generator(assets.model, assets.sentinels)
    rows, texts = [], []
    for i, (given, targets) in enumerate(ROWS):
        scene = make_sample(1, i, size)
        state = gen.new_state(1)
        for name in given:
            if assets.model.cfg.modality(name).kind == "sequence":
                state.set_sequence(name, assets.text_tokens(name, scene[name]))
            else:
                state.set_image(name, assets.vq[name].encode(to_input(name, scene[name])[None]).long())
        specs = [TargetSpec(t, "autoregressive", temperature=0.7, max_length=40) if assets.model.cfg.modality(t).kind == "sequence"
                 else TargetSpec(t, "maskgit", steps=8, token_schedule="cosine", temperature=1.0, temp_schedule="linear",
                                 cfg_scale=2.0) for t in targets]
        gen.generate(state, specs, seed=i)
        cells = [(f"given {n}", assets.picture(state, n)[0]) for n in given]
        cells += [(n, assets.picture(state, n)[0]) for n in targets]
        rows.append(cells)
        texts.append({"given": {n: scene[n] if isinstance(scene[n], str) else "(image)" for n in given},
                      "generated": {n: assets.picture(state, n)[0] for n in targets
                                    if assets.model.cfg.modality(n).kind == "sequence"}})
        _log(f"demo: row {i + 1}: {'+'.join(given)} -> {', '.join(targets)}")
    render_grid(rows).save(out / "samples.png")
    return {"samples": str(out / "samples.png"), "rows": [{"given": g, "targets": t} for g, t in ROWS], "text": texts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fourm_fast.demo", description=__doc__)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tokenizer-steps", type=int, default=120)
    ap.add_argument("--train-steps", type=int, default=400)
    args = ap.parse_args(argv)

    from .data import write_synthetic
    from .tokenizers.vq import tokenize_shards, train_text_tokenizer, train_tokenizer
    from .train.config import load_config
    from .train.trainer import train

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    summary: dict = {"stages": {}}
    t = time.perf_counter()
    manifest = write_synthetic(data, args.scenes, args.size, seed=0)
    summary["stages"]["synth"] = {"seconds": round(time.perf_counter() - t, 1), "folder": str(data),
                                  "scenes": args.scenes, "size": args.size, "modalities": manifest["modalities"]}
    t = time.perf_counter()
    quality = {}
    for m in ("rgb", "depth", "normal", "semseg"):
        res = train_tokenizer(data, m, steps=args.tokenizer_steps, batch_size=16, num_codes=256, log=_log)
        quality[m] = res["quality"]
    text = train_text_tokenizer(data, log=_log)
    summary["stages"]["tokenizers"] = {"seconds": round(time.perf_counter() - t, 1), "quality": quality,
                                       "text_vocab": text["vocab_size"], "folder": str(data / "tokenizers")}
    t = time.perf_counter()
    done = tokenize_shards(data, log=_log)
    summary["stages"]["tokenize"] = {"seconds": round(time.perf_counter() - t, 1),
                                     "tokens": {m: e["shape"] for m, e in done.items()}}
    t = time.perf_counter()
    run = out / "train"
    cfg = load_config(None, [
        "data.source=shards", f"data.path={data}", "modalities=auto", "data.num_input_tokens=64",
        "data.num_target_tokens=64", "model.overrides={dim: 128, encoder_depth: 2, decoder_depth: 2, num_heads: 4}",
        f"train.steps={args.train_steps}", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=5",
        "checkpoint.every=0", "log.tensorboard=false", f"out={run}"])
    result = train(cfg, log=_log)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary["stages"]["train"] = {"seconds": round(time.perf_counter() - t, 1), "folder": str(run),
                                  "steps": result["steps"], "first_loss": float(rows[0]["loss"]),
                                  "last_loss": float(rows[-1]["loss"]),
                                  "tokens_per_s": float(rows[-1]["tokens_per_s"]),
                                  "checkpoint": str(sorted((run / "checkpoints").iterdir())[-1])}
    t = time.perf_counter()
    summary["stages"]["generate"] = generate_samples(run, data, out, args.size)
    summary["stages"]["generate"]["seconds"] = round(time.perf_counter() - t, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _log(f"demo: outputs in {out}/ (summary.json: {out / 'summary.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
