"""Shard validation before any batch is made: image files and token arrays.

Bad data. Before any batch is made the shards are checked: every requested image file exists, its
SHA-256 matches the manifest (this is what catches a truncated or modified file), and its PNG/JPEG
header gives the manifest's size, bit depth and channels; token arrays have the manifest's shape
and dtype and their ids lie in [0, num_codes). A failure raises ShardError naming the file. With
skip_bad=True, a sample with a bad file is left out and counted (`loader.skipped`, the messages in
`loader.bad_files`, one log line); a problem that no sample can escape (a token array of the wrong
shape or dtype, a missing tokens/<m>.npy, an unreadable manifest) still raises.

What the checks cost (bench/bench_data.py, 2-core EPYC, warm page cache, 5 image modalities): about
0.1 ms per sample, once per loader, not per epoch; 21 % of one DALI epoch's time at 64 px and 3 % at
224 px. Most of it is opening the files; hashing adds about a quarter. So verification is on by
default; verify=False (headers only) is for shards on slow storage, where the pass would read every
byte one extra time. Without checksums a file truncated after its header fails in the decoder, and
the loader then decodes that batch's files with PIL to name it (such a failure cannot be skipped).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shards import ShardError

# Image modalities this loader decodes: channels, bits per channel, and whether JPEG is acceptable
# (not for class ids or 16-bit depth, where a lossy codec would change the values).
IMAGE_SPECS = {"rgb": (3, 8, True), "normal": (3, 8, True), "edges": (1, 8, True),
               "semseg": (1, 8, False), "depth": (1, 16, False)}
FLOAT_IMAGES = {"depth": 1000.0, "normal": 127.5}  # float32 outputs: depth / 1000 (metres), normal / 127.5 - 1
_PNG_COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class BadFile:
    index: int   # the sample that cannot be served
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Validation


def _image_header(data: bytes) -> tuple[str, int, int, int, int] | None:
    """(format, width, height, channels, bits) from a PNG IHDR or a JPEG SOF marker; None if neither."""
    if data.startswith(_PNG_SIGNATURE):
        if len(data) < 29 or data[12:16] != b"IHDR":
            return None
        width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 0)
        if colour == 3:  # palette: indices, not values
            channels = -1
        return "png", width, height, channels, bits
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                if pos + 10 > len(data):
                    return None
                bits, height, width, channels = struct.unpack(">BHHB", data[pos + 4:pos + 10])
                return "jpeg", width, height, channels, bits
            pos += 2 + length
        return None
    return None


def _check_image_file(m: str, rel: str, data: bytes, manifest: dict, size: int, verify: bool) -> str | None:
    """Why this file cannot be served, or None."""
    if verify:
        want = manifest["checksums"].get(rel)
        if want is None:
            return "not listed in the manifest's checksums"
        if hashlib.sha256(data).hexdigest() != want:
            return "checksum does not match the manifest (truncated or modified)"
    header = _image_header(data)
    if header is None:
        return f"not a PNG or JPEG image ({len(data)} bytes)"
    fmt, width, height, channels, bits = header
    want_channels, want_bits, jpeg_ok = IMAGE_SPECS[m]
    if fmt == "jpeg" and not jpeg_ok:
        return f"JPEG is lossy; {m} must be PNG"
    if (width, height) != (size, size):
        return f"{width}x{height} pixels, the manifest says {size}x{size}"
    if channels != want_channels or bits != want_bits:
        return f"{channels} channel(s) of {bits} bits, {m} needs {want_channels} of {want_bits}"
    return None


def read_file(path: str, limit: int | None = None) -> bytes:
    """A file's bytes (the first `limit` of them): os.open/os.read, a third of Path.read_bytes' or
    np.fromfile's per-file cost on small files, which matters at five files per sample."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        left = limit if limit is not None else -1
        while left != 0:
            chunk = os.read(fd, 1 << 22 if left < 0 else min(left, 1 << 22))
            if not chunk:
                break
            chunks.append(chunk)
            left = left - len(chunk) if left > 0 else left
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def scan_images(root: Path, manifest: dict, images: list[str], verify: bool = True) -> list[BadFile]:
    """Every requested image file of every sample: exists, checksum (verify), header. Returns the bad
    ones (not raised here, so the caller can skip or raise)."""
    bad = []
    size = manifest["size"]
    for m in images:
        ext = manifest["extensions"][m]
        for i in range(manifest["num_samples"]):
            rel = f"{m}/{i:06d}.{ext}"
            try:
                # verify=False: headers only (the PNG IHDR is in the first 33 bytes, a JPEG SOF after EXIF)
                data = read_file(f"{root}/{rel}", None if verify else 65536)
                if not verify and len(data) == 65536 and data.startswith(b"\xff\xd8") and _image_header(data) is None:
                    data = read_file(f"{root}/{rel}", None)  # APP segments (ICC, EXIF thumbnail) before the frame header
            except FileNotFoundError:
                bad.append(BadFile(i, root / rel, f"missing (listed in {root / 'manifest.json'})"))
                continue
            except OSError as e:
                bad.append(BadFile(i, root / rel, f"unreadable ({e})"))
                continue
            reason = _check_image_file(m, rel, data, manifest, size, verify)
            if reason:
                bad.append(BadFile(i, root / rel, reason))
    return bad


@dataclass
class TokenArrays:
    """Validated token arrays: image grids int16 [N, g, g], text ids int32 [N, L] + lengths int32 [N]."""
    arrays: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    kinds: dict[str, str]  # "image" | "sequence"
    bad: list[BadFile]     # per-row problems (ids out of range, lengths out of [1, L])


def _load_npy(path: Path, missing: str, sha256: str | None = None) -> np.ndarray:
    """The array at path; with sha256 (what tokenize recorded), its bytes must hash to it."""
    if not path.exists():
        raise ShardError(f"{path}: {missing}")
    try:
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ShardError(f"{path}: SHA-256 differs from the manifest's (changed after fourm-fast tokenize; "
                             f"tokenize again)")
        return np.load(io.BytesIO(data))
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{path}: unreadable ({e})") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizers_unchanged(root: Path, manifest: dict, names: list[str]) -> None:
    """The tokens of ``names`` were made by the tokenizer files DIR/tokenizers/ holds now (the hashes
    tokenize recorded). A tokenizer retrained after tokenize (text.json's WordPiece vocabulary
    differs from run to run even on the same data) would pair the stored ids with another
    vocabulary or codebook: training, decoding and generation would read them wrongly without a
    word. A tokenizer file that is absent is not checked (token-only training does not need it)."""
    entries = manifest.get("tokens") or {}
    for m in names:
        e = entries.get(m, {})
        want, name = e.get("tokenizer_sha256"), e.get("tokenizer")
        path = Path(root) / "tokenizers" / str(name)
        if want is None or name is None or not path.exists():
            continue
        if file_sha256(path) != want:
            raise ShardError(f"{Path(root) / 'tokens' / (m + '.npy')}: made by another {name} than {path} holds now "
                             f"(retrained after fourm-fast tokenize); run fourm-fast tokenize {root} again")


def load_tokens(root: Path, manifest: dict, names: list[str]) -> TokenArrays:
    """Load and check DIR/tokens/<m>.npy. Whole-file problems raise ShardError (no sample can be served
    without its row of a well-formed array); per-row problems come back in .bad."""
    entries = manifest.get("tokens") or {}
    unknown = [m for m in names if m not in entries]
    if unknown:
        if not entries:
            raise ShardError(f"{root}: the manifest lists no tokens; run fourm-fast tokenize {root}")
        raise ShardError(f"{root}: no tokens for {unknown} (tokenized: {list(entries)})")
    check_tokenizers_unchanged(root, manifest, names)
    n = manifest["num_samples"]
    out = TokenArrays({}, {}, {}, [])
    for m in names:
        path = root / "tokens" / f"{m}.npy"
        sums = entries[m].get("sha256", {})  # absent in manifests written before tokenize recorded them
        arr = _load_npy(path, "missing (listed in the manifest's tokens)", sums.get(f"{m}.npy"))
        want = tuple(entries[m]["shape"])
        if arr.shape != want:
            raise ShardError(f"{path}: shape {arr.shape}, the manifest says {want}")
        if arr.shape[0] != n:
            raise ShardError(f"{path}: {arr.shape[0]} rows for {n} samples")
        num_codes = entries[m]["num_codes"]
        if arr.ndim == 3:
            if arr.dtype != np.int16:
                raise ShardError(f"{path}: dtype {arr.dtype}, expected int16 token grids")
            out.kinds[m] = "image"
        elif arr.ndim == 2:
            if arr.dtype != np.int32:
                raise ShardError(f"{path}: dtype {arr.dtype}, expected int32 token ids")
            lpath = root / "tokens" / f"{m}.lengths.npy"
            lengths = _load_npy(lpath, "missing", sums.get(f"{m}.lengths.npy"))
            if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
                raise ShardError(f"{lpath}: {lengths.dtype} {lengths.shape}, expected integer lengths of shape ({n},)")
            for i in np.flatnonzero((lengths < 1) | (lengths > arr.shape[1])):
                out.bad.append(BadFile(int(i), lpath, f"row {i}: length {lengths[i]} outside [1, {arr.shape[1]}]"))
            out.kinds[m] = "sequence"
            out.lengths[m] = lengths.astype(np.int32)
        else:
            raise ShardError(f"{path}: {arr.ndim} dimensions; expected [N, g, g] grids or [N, L] ids")
        rows = (arr < 0) | (arr >= num_codes)
        for i in np.flatnonzero(rows.reshape(n, -1).any(1)):
            out.bad.append(BadFile(int(i), path, f"row {i}: token ids outside [0, {num_codes})"))
        out.arrays[m] = arr
    return out


def resolve_bad(bad: list[BadFile], n: int, skip_bad: bool, root: Path, log=_log_stderr) -> tuple[np.ndarray, int]:
    """Raise on the first bad file, or (skip_bad) drop its sample and count it. Returns the good sample
    ids (sorted, int64) and the number of skipped samples."""
    if bad and not skip_bad:
        more = len(bad) - 1
        tail = f" (and {more} more bad file{'s' if more > 1 else ''})" if more else ""
        raise ShardError(f"{bad[0]}{tail}; skip_bad=True leaves such samples out and counts them")
    drop = np.zeros(n, bool)
    for b in bad:
        drop[b.index] = True
    skipped = int(drop.sum())
    if skipped and log is not None:
        log(f"fourm_fast.data: skipped {skipped} of {n} samples in {root} with bad files "
            f"({len(bad)} bad file{'s' if len(bad) > 1 else ''}; first: {bad[0]})")
    return np.flatnonzero(~drop).astype(np.int64), skipped
