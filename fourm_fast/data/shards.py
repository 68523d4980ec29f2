"""Shards on disk: one folder per modality, one file per sample, and DIR/manifest.json.

  rgb/000042.png      RGB, 8 bit
  depth/000042.png    16-bit grey, depth in millimetres (depth * 1000)
  normal/000042.png   RGB, (n + 1) / 2 * 255
  semseg/000042.png   8-bit class ids
  edges/000042.png    8-bit
  caption/000042.txt  UTF-8
  det/000042.txt      UTF-8, 4M's box text

manifest.json: format, modalities, num_samples, size, seed, the file extension of each modality and
the SHA-256 of every file (the reader names the file whose bytes do not match).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import make_sample

FORMAT = "fourm_fast.shards/1"
MODALITIES = {"rgb": "png", "depth": "png", "normal": "png", "semseg": "png", "edges": "png", "caption": "txt", "det": "txt"}


class ShardError(ValueError):
    pass


def _encode(name: str, value) -> bytes:
    if name in ("caption", "det"):
        return value.encode("utf-8")
    # rounded to the nearest step: at most half a step off (a truncating cast read depth up to 1 mm
    # short); 8 bits cannot hold a normal component of exactly 0, which reads as +0.0039
    if name == "depth":
        arr = np.clip(np.rint(value * 1000.0), 0, 65535).astype(np.uint16)
    elif name == "normal":
        arr = np.clip(np.rint((value + 1.0) * 127.5), 0, 255).astype(np.uint8)
    else:
        arr = value
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _decode(name: str, data: bytes, path: Path, size: int):
    if name in ("caption", "det"):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ShardError(f"{path}: not UTF-8 text ({e})") from None
    # the batch loader's header rule: PIL decodes an 8-bit depth, RGBA or a wrong size without complaint
    from .validate import IMAGE_SPECS, _check_image_file  # here: validate imports this module

    reason = _check_image_file(name, path.name, data, {}, size, verify=False) if name in IMAGE_SPECS else None
    if reason:
        channels, bits, _ = IMAGE_SPECS[name]
        raise ShardError(f"{path}: {reason}; {name} needs {size}x{size} pixels, {channels} channel(s) of {bits} bits")
    try:
        arr = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad images
        raise ShardError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if name == "depth":
        return arr.astype(np.float32) / 1000.0
    if name == "normal":
        return arr.astype(np.float32) / 127.5 - 1.0
    return arr


def write_synthetic(out: str | Path, n: int, size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Render n scenes and write them as shards; returns the manifest."""
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out)
    for m in MODALITIES:
        (out / m).mkdir(parents=True, exist_ok=True)
    checksums = {}
    t0 = time.perf_counter()
    for i in range(n):
        sample = make_sample(seed, i, size)
        for m, ext in MODALITIES.items():
            rel = f"{m}/{i:06d}.{ext}"
            data = _encode(m, sample[m])
            (out / rel).write_bytes(data)
            checksums[rel] = hashlib.sha256(data).hexdigest()
        if progress and (i + 1 == n or (i + 1) % max(1, n // 10) == 0):
            rate = (i + 1) / (time.perf_counter() - t0)
            print(f"synth: {i + 1}/{n} scenes ({rate:.0f}/s)", file=sys.stderr, flush=True)
    manifest = {"format": FORMAT, "modalities": list(MODALITIES), "num_samples": n, "size": size, "seed": seed,
                "extensions": MODALITIES, "checksums": checksums}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")
    return manifest


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if not path.exists():
        raise ShardError(f"{path} is missing: not a fourm_fast shard folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: holds {json.dumps(manifest)[:60]}, not a JSON object")
    for key in ("format", "modalities", "num_samples", "extensions", "checksums", "size"):
        if key not in manifest:
            raise ShardError(f"{path}: the manifest has no {key!r}")
    if manifest["format"] != FORMAT:
        raise ShardError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    # types too, so that a hand-edited manifest fails here and not as a TypeError deep in a reader
    _check_value(path, "num_samples", manifest["num_samples"], _is_int, "an integer >= 1")
    _check_value(path, "size", manifest["size"], _is_int, "an integer >= 1")
    _check_value(path, "modalities", manifest["modalities"],
                 lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names")
    for key in ("extensions", "checksums"):
        _check_value(path, key, manifest[key],
                     lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "an object of strings")
    tokens = manifest.get("tokens")
    if tokens is not None:  # written by fourm-fast tokenize
        _check_value(path, "tokens", tokens, lambda v: isinstance(v, dict), "an object")
        for m, entry in tokens.items():
            key = f"tokens.{m}"
            _check_value(path, key, entry, lambda v: isinstance(v, dict), "an object")
            for k in ("shape", "num_codes"):
                if k not in entry:
                    raise ShardError(f"{path}: {key} has no {k!r}")
            _check_value(path, f"{key}.shape", entry["shape"],
                         lambda v: isinstance(v, list) and len(v) in (2, 3) and all(_is_int(x, 0) for x in v),
                         "a list of 2 or 3 integers")
            _check_value(path, f"{key}.num_codes", entry["num_codes"], _is_int, "an integer >= 1")
            _check_value(path, f"{key}.sha256", entry.get("sha256", {}), lambda v: isinstance(v, dict), "an object")
    return manifest


def _is_int(value, lo: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _check_value(path: Path, key: str, value, ok, want: str) -> None:
    if not ok(value):
        raise ShardError(f"{path}: {key!r} is {json.dumps(value)[:60]}, expected {want}")


def read_sample(root: str | Path, index: int, manifest: dict | None = None, verify: bool = True,
                modalities: list[str] | None = None) -> dict:
    """One sample's modalities, decoded; a missing file, a checksum mismatch or an unreadable image
    raises ShardError naming the file."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    if not 0 <= index < manifest["num_samples"]:
        raise ShardError(f"{root}: sample {index} out of range (num_samples {manifest['num_samples']})")
    out = {}
    for m in modalities or manifest["modalities"]:
        if m not in manifest["extensions"]:
            raise ShardError(f"{root}: modality {m!r} is not in the manifest ({manifest['modalities']})")
        rel = f"{m}/{index:06d}.{manifest['extensions'][m]}"
        path = root / rel
        if not path.exists():
            raise ShardError(f"{path}: missing (listed in {root / 'manifest.json'})")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != manifest["checksums"].get(rel):
            raise ShardError(f"{path}: checksum does not match the manifest (truncated or modified)")
        out[m] = _decode(m, data, path, manifest["size"])
    return out
