"""VQ image tokenizer: patch encoder -> VectorQuantizer (the vq_lookup op) -> decoder.

One small conv net per image-like modality, trained on the shards in minutes on a CPU for the
synthetic world. ``encode`` gives an int16 token grid (image_size / 8 per side), ``decode`` the
reconstruction. Reconstruction quality (PSNR for rgb/depth/normal, pixel accuracy for semseg) is
measured on held-out samples and stored with the weights.
"""
from __future__ import annotations

import hashlib
import io
import json
import math

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.shards import ShardError, read_manifest, read_sample
from ..data.validate import file_sha256
from ..nn import VectorQuantizer

# channels of each modality as the tokenizer sees it (semseg: one-hot of its classes)
CHANNELS = {"rgb": 3, "depth": 1, "normal": 3, "edges": 1, "semseg": 4}
VERSION = 1


@dataclass(frozen=True)
class VQConfig:
    modality: str
    image_size: int = 64
    num_codes: int = 256
    code_dim: int = 32
    width: int = 64

    def __post_init__(self):
        # token grids are stored as int16 (tokenize_shards): ids above 32767 would wrap negative
        if not 1 <= self.num_codes <= 32768:
            raise ValueError(f"VQ tokenizer: num_codes must be in 1..32768 (token grids are int16), got {self.num_codes}")

    @property
    def grid(self) -> int:
        return self.image_size // 8

    @property
    def channels(self) -> int:
        return CHANNELS[self.modality]


def to_input(modality: str, value: np.ndarray) -> Tensor:
    """Shard array -> (C, H, W) float in about [-1, 1] (semseg: one-hot)."""
    if modality == "semseg":
        return F.one_hot(torch.from_numpy(value.astype(np.int64)), CHANNELS["semseg"]).permute(2, 0, 1).float()
    t = torch.from_numpy(np.asarray(value, dtype=np.float32))
    if modality == "rgb":
        return t.permute(2, 0, 1) / 127.5 - 1.0
    if modality == "depth":
        return (t[None] - 6.0) / 4.0
    if modality == "edges":
        return t[None] / 127.5 - 1.0
    return t.permute(2, 0, 1)  # normal, already in [-1, 1]


# semseg classes as colours for pictures (background, then the object classes)
SEMSEG_PALETTE = np.array([[20, 20, 20], [230, 80, 60], [70, 160, 230], [240, 200, 60]], np.uint8)


def to_display(modality: str, x: Tensor) -> np.ndarray:
    """Inverse of to_input for pictures: (B, C, H, W) decoder output -> uint8 (B, H, W, 3)."""
    x = x.detach().float().cpu()
    if modality == "semseg":
        return SEMSEG_PALETTE[x.argmax(1).numpy() % len(SEMSEG_PALETTE)]
    if modality == "rgb":
        img = (x + 1.0) * 127.5
    elif modality == "depth":
        img = ((1.0 - x) * 127.5).repeat(1, 3, 1, 1)  # depth 2 m bright .. 10 m (background) black
    elif modality == "edges":
        img = ((x + 1.0) * 127.5).repeat(1, 3, 1, 1)
    else:  # normal
        img = (x + 1.0) * 127.5
    return img.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        if cfg.modality not in CHANNELS:
            raise ValueError(f"no VQ tokenizer for modality {cfg.modality!r} (image-like: {sorted(CHANNELS)})")
        if cfg.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {cfg.image_size}")
        self.cfg = cfg
        w, c = cfg.width, cfg.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w, 4, 2, 1), nn.GELU(), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.GELU(), nn.Conv2d(2 * w, cfg.code_dim, 1))
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, ema_decay=0.99, dead_code_threshold=1.0,
                                         check_finite=False)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, 2 * w, 1), nn.GELU(), nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.GELU(), nn.ConvTranspose2d(w, c, 4, 2, 1))

    def _quantize(self, x: Tensor):
        z = self.encoder(x).permute(0, 2, 3, 1)  # (B, g, g, D)
        return self.quantizer(z)

    def forward(self, x: Tensor):
        q = self._quantize(x)
        return self.decoder(q.quantized.permute(0, 3, 1, 2)), q

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self._quantize(x).indices.to(torch.int16)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        codes = self.quantizer.codebook[tokens.long()]
        return self.decoder(codes.permute(0, 3, 1, 2))

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rec, q = self(x)
        if self.cfg.modality == "semseg":
            target = x.argmax(1)
            return F.cross_entropy(rec, target) + q.loss, rec
        return F.mse_loss(rec, x) + q.loss, rec

    def quality(self, x: Tensor) -> dict:
        """PSNR in dB over the [-1, 1] range (peak-to-peak 2), or pixel accuracy for semseg."""
        with torch.no_grad():
            rec = self.decode(self.encode(x))
        if self.cfg.modality == "semseg":
            return {"pixel_accuracy": float((rec.argmax(1) == x.argmax(1)).float().mean())}
        mse = float(F.mse_loss(rec.clamp(-1, 1), x.clamp(-1, 1)))
        return {"psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12))}

    def save(self, path: str | Path, metadata: dict) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": asdict(self.cfg), "version": VERSION, **metadata}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"fourm_fast_vq": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> tuple["VQTokenizer", dict]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"VQ tokenizer {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("fourm_fast_vq", "null") or "null")
            if not meta:
                raise ValueError("no fourm_fast_vq metadata")
            model = cls(VQConfig(**meta["config"]))
            model.load_state_dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors, json, config and shape errors alike
            raise ValueError(f"{path} is not a readable fourm_fast VQ tokenizer: {type(e).__name__}: {e}") from None
        return model.eval(), meta


def load_images(root: Path, modality: str, indices: list[int], manifest: dict) -> Tensor:
    out = []
    for i in indices:
        value = read_sample(root, i, manifest, modalities=[modality])[modality]
        if modality == "semseg" and value.size and int(value.max()) >= CHANNELS["semseg"]:
            path = Path(root) / "semseg" / f"{i:06d}.{manifest['extensions']['semseg']}"
            raise ShardError(f"{path}: class id {int(value.max())}, the semseg tokenizer knows {CHANNELS['semseg']} classes")
        out.append(to_input(modality, value))
    return torch.stack(out)


def _check_out(path: Path) -> None:
    """Refuse an output path that cannot be written before training, not after it."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the tokenizer is saved to a file (give a file path)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: {parent} is a file, not a directory")
            break


def train_tokenizer(data: str | Path, modality: str, steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
                    num_codes: int = 256, seed: int = 0, out: str | Path | None = None, log=print) -> dict:
    """Train on the shards' first 90 % of samples, measure on the last 10 %; save under
    DATA/tokenizers/<modality>.safetensors unless ``out`` says otherwise."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tokenizer {modality}: {name} must be an integer >= 1, got {value!r}")
    root = Path(data)
    manifest = read_manifest(root)
    if modality not in manifest["modalities"]:
        raise ValueError(f"{root}: no modality {modality!r} (has {manifest['modalities']})")
    n = manifest["num_samples"]
    if n < 10:
        raise ValueError(f"{root}: {n} samples are too few to train and evaluate a tokenizer (need >= 10)")
    path = Path(out) if out else root / "tokenizers" / f"{modality}.safetensors"
    _check_out(path)
    torch.manual_seed(seed)
    cfg = VQConfig(modality, image_size=manifest["size"], num_codes=num_codes)
    model = VQTokenizer(cfg)
    n_eval = max(1, n // 10)
    train_idx = list(range(n - n_eval))
    images = load_images(root, modality, train_idx, manifest)
    held_out = load_images(root, modality, list(range(n - n_eval, n)), manifest)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        loss, _ = model.loss(batch)
        if not math.isfinite(loss.item()):  # a CPU loop: reading the loss waits for nothing
            # a diverged tokenizer would be saved with NaN codes and fail only later, in tokenize
            raise ValueError(f"tokenizer {modality}: training diverged (loss {loss.item()} at step {step + 1} of "
                             f"{steps}, lr {lr}); nothing was saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"tokenizer {modality}: step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # NaN gradients or a NaN EMA update on the last step, after the last loss check
        raise ValueError(f"tokenizer {modality}: training diverged (NaN or inf in {', '.join(bad[:3])} after "
                         f"{steps} steps, lr {lr}); nothing was saved")
    quality = model.quality(held_out)
    meta = {"quality": quality, "steps": steps, "train_samples": len(train_idx), "eval_samples": n_eval,
            "seconds": round(time.perf_counter() - t0, 1)}
    model.save(path, meta)
    log(f"tokenizer {modality}: {quality} on {n_eval} held-out samples -> {path}")
    return {"path": str(path), **meta}


def train_text_tokenizer(data: str | Path, vocab_size: int = 500, out: str | Path | None = None, log=print) -> dict:
    """WordPiece over the shards' captions and box texts (one text tokenizer, as 4M shares one)."""
    from ..data.synthetic import SHAPES
    from .text import special_tokens, train_wordpiece

    root = Path(data)
    manifest = read_manifest(root)
    path = Path(out) if out else root / "tokenizers" / "text.json"
    _check_out(path)
    texts = [read_sample(root, i, manifest, modalities=[m])[m] for m in ("caption", "det") if m in manifest["modalities"]
             for i in range(manifest["num_samples"])]
    if not any(t.strip() for t in texts):  # WordPiece would learn no words and save a useless text.json
        raise ValueError(f"{root}: no texts to train the text tokenizer on (looked for the caption and det "
                         f"modalities; the manifest has {manifest['modalities']})")
    # vocab_size counts the learned word pieces, on top of 4M's special tokens
    tok = train_wordpiece(texts, vocab_size=len(special_tokens(200, SHAPES)) + vocab_size, class_names=SHAPES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    log(f"tokenizer text: {tok.vocab_size} tokens from {len(texts)} texts -> {path}")
    return {"path": str(path), "vocab_size": tok.vocab_size}


def _save_array(path: Path, arr: np.ndarray) -> str:
    """np.save through a temporary file and a rename (a failed run never leaves a half-written
    array under the old manifest entry); returns the file's SHA-256 for the manifest."""
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def tokenize_shards(data: str | Path, log=print) -> dict:
    """Token grids (int16 .npy, [N, g, g]) for every modality with a trained VQ tokenizer and text
    ids (int32 [N, L], 0-padded, with tokens/<m>.lengths.npy) when DATA/tokenizers/text.json exists,
    into DATA/tokens/; the tokenizer versions go into the manifest."""
    root = Path(data)
    manifest = read_manifest(root)
    tok_dir = root / "tokenizers"
    done = {}
    vq = {}  # modality -> (path, model, meta); all checked before any token file is written
    for path in sorted(tok_dir.glob("*.safetensors")) if tok_dir.exists() else []:
        model, meta = VQTokenizer.load(path)
        m = meta["config"]["modality"]
        if m in vq:
            raise ValueError(f"{tok_dir}: two {m} tokenizers, {vq[m][0].name} and {path.name}; keep one of them")
        size = model.cfg.image_size
        if size != manifest["size"]:  # the convolutions would encode any size: a wrong grid without a word
            raise ValueError(f"{path}: the {m} tokenizer takes {size} x {size} px images, the images in {root} are "
                             f"{manifest['size']} x {manifest['size']}; retrain it with fourm-fast tokenizer train")
        vq[m] = (path, model, meta)
    for m, (path, model, meta) in vq.items():
        grids = []
        for start in range(0, manifest["num_samples"], 64):
            idx = list(range(start, min(start + 64, manifest["num_samples"])))
            grids.append(model.encode(load_images(root, m, idx, manifest)).numpy())
        arr = np.concatenate(grids).astype(np.int16)
        (root / "tokens").mkdir(exist_ok=True)
        sums = {f"{m}.npy": _save_array(root / "tokens" / f"{m}.npy", arr)}
        done[m] = {"tokenizer": path.name, "version": meta["version"], "shape": list(arr.shape),
                   "num_codes": meta["config"]["num_codes"], "sha256": sums, "tokenizer_sha256": file_sha256(path)}
        log(f"tokenize: {m} -> tokens/{m}.npy {arr.shape}")
    text_path = tok_dir / "text.json"
    if text_path.exists():
        from .text import TextTokenizer

        tok = TextTokenizer.load(text_path)
        for m in ("caption", "det"):
            if m not in manifest["modalities"]:
                continue
            ids = [tok.encode(read_sample(root, i, manifest, modalities=[m])[m]) for i in range(manifest["num_samples"])]
            width = max(len(x) for x in ids)
            arr = np.zeros((len(ids), width), np.int32)  # [PAD] = 0
            for i, x in enumerate(ids):
                arr[i, :len(x)] = x
            (root / "tokens").mkdir(exist_ok=True)
            sums = {f"{m}.npy": _save_array(root / "tokens" / f"{m}.npy", arr),
                    f"{m}.lengths.npy": _save_array(root / "tokens" / f"{m}.lengths.npy",
                                                    np.array([len(x) for x in ids], np.int32))}
            done[m] = {"tokenizer": "text.json", "version": 1, "shape": list(arr.shape), "num_codes": tok.vocab_size,
                       "num_sentinels": tok.num_sentinels, "sha256": sums, "tokenizer_sha256": file_sha256(text_path)}
            log(f"tokenize: {m} -> tokens/{m}.npy {arr.shape} (EOS included)")
    if not done:
        raise ValueError(f"{root}: no tokenizers in {tok_dir}; train one with fourm-fast tokenizer train")
    manifest["tokens"] = done
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / "manifest.json")
    return done


