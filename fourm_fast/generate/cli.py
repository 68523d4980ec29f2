"""`fourm-fast generate`: chained any-to-any generation from a training checkpoint.

  fourm-fast generate --checkpoint demo_out/train --cond caption="a red circle" --target semseg,depth,rgb \\
      --steps 8 --temperature 1.0 --cfg 3.0 --seed 0 --out gen/

writes gen/samples.png (one row per sample: conditions, then targets in order, images decoded by the
VQ tokenizers), gen/text.json (sequence modalities as text), gen/tokens/<target>.npy and
gen/settings.json. The same checkpoint, conditions, settings and seed give byte-identical files.
Text conditions need a run trained on tokenized shards (`make demo` writes one to demo_out/train):
its data folder holds the text tokenizer.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data.validate import file_sha256
from .render import render_grid
from .sampler import Generator
from .schedules import TargetSpec
from .state import GenerationState


class Assets:
    """A checkpoint's model with the tokenizers its data used (when they exist). A model trained
    on a text tokenizer's tokens needs that tokenizer's sentinel ids to generate a sequence: without
    text.json, ``sentinels`` is empty and ``missing_text`` says why (images still generate)."""

    def __init__(self, checkpoint: str | Path, tokenizers: str | Path | None = None, device: str = "cpu"):
        from ..train.checkpoint import load_model

        if not Path(checkpoint).exists():  # load_model would report a missing model.safetensors in it
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        self.model, self.train_config, self.path, trained_with = load_model(checkpoint, device)
        data = self.train_config.get("data", {})
        folder = Path(tokenizers) if tokenizers else (Path(data["path"]) / "tokenizers" if data.get("source") == "shards" else None)
        self.vq, self.text = {}, None
        if folder is not None:
            if not folder.is_dir():
                raise FileNotFoundError(f"tokenizer folder {folder} does not exist (pass --tokenizers DIR)")
            from ..tokenizers.vq import VQTokenizer

            for f in sorted(folder.glob("*.safetensors")):
                tok, meta = VQTokenizer.load(f)
                self.vq[meta["config"]["modality"]] = tok
            if (folder / "text.json").exists():
                from ..tokenizers.text import TextTokenizer

                self.text = TextTokenizer.load(folder / "text.json")
        if folder is not None and trained_with:
            self._check_trained_with(folder, trained_with)
        cfg = self.model.cfg
        seqs = [m for m in cfg.modalities if m.kind == "sequence"]
        self.missing_text = None
        if self.text is not None:
            self.sentinels = {m.name: self.text.sentinel_ids for m in seqs}
        elif data.get("source") == "synthetic" or not seqs:
            # the synthetic source's convention: the last num_sentinels ids, [S_1] first
            ns = int(data.get("num_sentinels", 100))
            self.sentinels = {m.name: [0] + list(range(m.vocab_size - ns, m.vocab_size)) for m in seqs}
        else:  # its sentinels are the text tokenizer's: the synthetic ones would be other ids
            where = folder / "text.json" if folder is not None else "text.json"
            self.sentinels = {}
            self.missing_text = (f"{where} does not exist: checkpoint {self.path} was trained on {seqs[0].name} "
                                 f"tokens of that text tokenizer, whose sentinel ids generating a sequence needs "
                                 f"(pass --tokenizers DIR holding it)")

    def _check_trained_with(self, folder: Path, trained_with: dict) -> None:
        """The tokenizers in ``folder`` must be the files the model's tokens came from: a codebook
        or WordPiece vocabulary retrained since would decode (and encode conditions) into ids the
        model never learnt, without a word. A missing VQ file only leaves images undecoded (shown as
        token ids); without text.json no sequence can be generated (see missing_text)."""
        for m, rec in sorted(trained_with.items()):
            path = folder / str(rec.get("file"))
            if m not in self.model.modalities or not rec.get("sha256") or not path.exists():
                continue
            if file_sha256(path) != rec["sha256"]:
                raise ValueError(f"{path} changed since the checkpoint {self.path} was trained on {m} tokens made "
                                 f"with it (retrained?): put back the tokenizer the model learnt, or train the "
                                 f"model again on tokens of this one")

    def image_tokens(self, name: str, value: str) -> torch.Tensor:
        """A condition image: a .npy token grid ((g, g), or (B, g, g) for one per sample), or an
        image file at the tokenizer's size through the VQ tokenizer."""
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"--cond {name}={value}: no such file")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ValueError(f"--cond {name}={value}: not a readable .npy array ({e})") from None
            if arr.dtype.kind not in "iu":  # a float grid used to be truncated to ids without a word
                raise ValueError(f"--cond {name}={value}: token ids must be integers, got {arr.dtype}")
            return torch.from_numpy(arr.astype(np.int64))  # GenerationState.set_image checks the shape
        if name not in self.vq:
            raise ValueError(f"--cond {name}={value}: no VQ tokenizer for {name}; pass its token grid as .npy")
        from PIL import Image, UnidentifiedImageError

        from ..tokenizers.vq import CHANNELS, to_input

        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--cond {name}={value}: not a readable image ({e})") from None
        if name in ("rgb", "normal") and img.mode != "RGB":
            img = img.convert("RGB")  # RGBA, greyscale or palette pictures: their colours
        elif name == "edges" and img.mode != "L":
            img = img.convert("L")
        arr = np.asarray(img)
        if arr.ndim != (3 if name in ("rgb", "normal") else 2):  # depth and semseg values must not be recoloured
            raise ValueError(f"--cond {name}={value}: a {name} image is single-channel (as the shards store it), "
                             f"got PIL mode {img.mode}")
        size = self.vq[name].cfg.image_size
        if arr.shape[:2] != (size, size):
            raise ValueError(f"--cond {name}={value}: the image is {arr.shape[1]} x {arr.shape[0]} px; the {name} "
                             f"tokenizer takes {size} x {size} (resize it first)")
        if name == "depth":
            arr = arr.astype(np.float32) / 1000.0
        elif name == "normal":
            arr = arr.astype(np.float32) / 127.5 - 1.0
        elif name == "semseg" and int(arr.max()) >= CHANNELS["semseg"]:
            raise ValueError(f"--cond {name}={value}: class ids must be below {CHANNELS['semseg']}, found {int(arr.max())}")
        return self.vq[name].encode(to_input(name, arr)[None]).long().reshape(1, -1)

    def text_tokens(self, name: str, text: str) -> list[int]:
        if self.text is None:
            raise ValueError(f"--cond {name}=...: the checkpoint's data has no text tokenizer (pass --tokenizers DIR)")
        return self.text.encode(text)

    def condition(self, state: GenerationState, name: str, value: str) -> None:
        if name not in self.model.encoder_embeddings:  # the encoder would never see it
            raise ValueError(f"--cond {name}=...: {name} is not an input modality of this model "
                             f"(inputs: {', '.join(self.model.encoder_embeddings)})")
        kind = self.model.cfg.modality(name).kind
        if kind == "image":
            state.set_image(name, self.image_tokens(name, value))
        else:
            state.set_sequence(name, self.text_tokens(name, value))

    def picture(self, state: GenerationState, name: str) -> list:
        """Per sample: a uint8 image (decoded, or the token ids as grey levels) or text."""
        m = self.model.cfg.modality(name)
        B = state.B
        if m.kind == "sequence":
            seqs = [state.sequence(name, b) for b in range(B)]
            return [self.text.decode(s) if self.text else " ".join(map(str, s)) for s in seqs]
        if name in self.vq:
            from .sampler import decode_images

            return list(decode_images(state, {name: self.vq[name]})[name])
        g = math.isqrt(m.num_tokens)
        ids = state.tokens[name].reshape(B, g, g).cpu().numpy()
        grey = (ids * 255 // max(m.vocab_size - 1, 1)).astype(np.uint8)
        return [np.repeat(x[..., None], 3, axis=2) for x in grey]


def _per_target(value: str, n: int, cast, name: str) -> list:
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) == 1:
        parts = parts * n
    if len(parts) != n:
        raise ValueError(f"--{name}: give one value or one per target ({n}), got {value!r}")
    return [cast(p) for p in parts]


def build_targets(model, args) -> list[TargetSpec]:
    names = [t.strip() for t in args.target.split(",") if t.strip()]
    if not names:
        raise ValueError("--target: name at least one modality")
    n = len(names)
    kinds = [model.cfg.modality(t).kind for t in names]
    schemes = _per_target(args.scheme, n, str, "scheme") if args.scheme else \
        ["autoregressive" if k == "sequence" else "maskgit" for k in kinds]
    steps = _per_target(args.steps, n, int, "steps")
    temps = _per_target(args.temperature, n, float, "temperature")
    cfgs = _per_target(args.cfg, n, float, "cfg")
    token_s = _per_target(args.token_schedule, n, str, "token-schedule")
    temp_s = _per_target(args.temp_schedule, n, str, "temp-schedule")
    return [TargetSpec(t, s, st, ts, tp, tps, c, top_k=args.top_k, top_p=args.top_p)
            for t, s, st, ts, tp, tps, c in zip(names, schemes, steps, token_s, temps, temp_s, cfgs)]


def run_generation(assets: Assets, conditions: dict[str, str], targets: list[TargetSpec], batch: int, seed: int,
                   out: Path, log=None) -> dict:
    """Generate and write samples.png, text.json, tokens/<target>.npy and settings.json into out
    (other files there are left as they are: settings.json names this run's targets)."""
    model = assets.model
    if assets.missing_text and any(model.cfg.modality(t.name).kind == "sequence" for t in targets):
        raise FileNotFoundError(assets.missing_text)
    gen = Generator(model, assets.sentinels, log=log)
    state = gen.new_state(batch)
    for name, value in conditions.items():
        assets.condition(state, name, value)
    try:  # before generating: an unwritable --out used to fail only after the whole run
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokens").mkdir(exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {out}: cannot create the output folder ({e.strerror or e})") from None
    gen.generate(state, targets, seed=seed)
    columns = list(conditions) + [t.name for t in targets if t.name not in conditions]
    pictures = {n: assets.picture(state, n) for n in columns}
    rows = [[(("given " if n in conditions else "") + n, pictures[n][b]) for n in columns] for b in range(batch)]
    render_grid(rows).save(out / "samples.png")
    texts = {n: pictures[n] for n in columns if model.cfg.modality(n).kind == "sequence"}
    (out / "text.json").write_text(json.dumps(texts, indent=1, sort_keys=True))
    for t in targets:
        np.save(out / "tokens" / f"{t.name}.npy", state.tokens[t.name].cpu().numpy())
    settings = {"checkpoint": str(assets.path), "conditions": conditions, "targets": [asdict(t) for t in targets],
                "batch": batch, "seed": seed}
    (out / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    return {"samples": str(out / "samples.png"), "text": texts, "settings": settings}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training --out folder (latest checkpoint)")
    p.add_argument("--cond", action="append", default=[], metavar="MOD=VALUE",
                   help="a condition: text for a sequence modality, an image or .npy token grid for an image modality")
    p.add_argument("--target", required=True, help="comma-separated modalities, generated in this order")
    p.add_argument("--scheme", help="maskgit, roar or autoregressive (one, or one per target; default by modality)")
    p.add_argument("--steps", default="8", help="decoding steps (MaskGIT / ROAR)")
    p.add_argument("--temperature", default="1.0")
    p.add_argument("--temp-schedule", default="constant", help="constant, linear or onex:MIN_T:POWER")
    p.add_argument("--token-schedule", default="cosine", help="cosine or linear (MaskGIT)")
    p.add_argument("--cfg", default="1.0", help="classifier-free guidance scale on all earlier modalities")
    p.add_argument("--top-k", type=_count_or_fraction, default=0, help="a count, or a fraction of the vocabulary in (0, 1) (0: off)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus filtering (0: off)")
    p.add_argument("--batch", type=int, default=4, help="samples per condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizers", help="tokenizer folder (default: the training data's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", required=True)


def _count_or_fraction(text: str) -> int | float:
    """--top-k: an int when whole (so "0" and the default write the same settings.json), else a float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def _device(name: str) -> torch.device:
    """--device, checked here: a missing GPU or a misspelt device ended in a traceback."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import CheckpointError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        conditions = {}
        for c in args.cond:
            if "=" not in c:
                raise ValueError(f"--cond {c!r}: write MODALITY=VALUE")
            k, v = c.split("=", 1)
            if k.strip() in conditions:
                raise ValueError(f"--cond {k.strip()}: given twice")
            conditions[k.strip()] = v
        assets = Assets(args.checkpoint, args.tokenizers, _device(args.device))
        targets = build_targets(assets.model, args)
        both = [t.name for t in targets if t.name in conditions]
        if both:
            raise ValueError(f"{both} are both conditions and targets: a target is generated, a condition given")
        res = run_generation(assets, conditions, targets, args.batch, args.seed, Path(args.out), log=log)
    except (ValueError, KeyError, OSError, CheckpointError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
        print(f"fourm-fast generate: error: {text}", file=sys.stderr)
        return 2
    log(f"generate: wrote {res['samples']} and {Path(args.out) / 'settings.json'}")
    return 0
