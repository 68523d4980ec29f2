"""Shards as training batches: validation, the epoch plan, the torch loader and build_loader.

Token arrays (after `fourm-fast tokenize DIR`):

  DIR/tokens/<image modality>.npy    int16 [N, g, g] VQ token grids
  DIR/tokens/<text modality>.npy     int32 [N, L] WordPiece ids, 0-padded, EOS included
  DIR/tokens/<text modality>.lengths.npy   int32 [N]

`build_loader(DIR, B, backend="dali" | "torch")` yields the same batches from either backend (a dict;
see `fourm_fast.data.dali` for its contents). Both read the same validated sample list and draw
crops and flips from the same `EpochPlan`, so for PNG shards the two are equal bit for bit; the
torch backend (PIL decode in DataLoader workers) is the baseline that bench/bench_data.py measures
DALI against.

Bad data and what checking costs: see fourm_fast.data.validate.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .shards import ShardError, read_manifest
from .validate import IMAGE_SPECS, _check_image_file, _log_stderr, load_tokens, read_file, resolve_bad, scan_images

# ---------------------------------------------------------------------------------------------
# Token shards for the trainer


class TokenShards(torch.utils.data.Dataset):
    """Per sample: image modality -> int64 [g * g]; text modality -> int64 [L] ids with its length.

    ``self.good`` lists the ids of the samples served (all of them unless skip_bad left some out;
    ``self.skipped`` counts those); positions index ``good``, ``batch`` takes sample ids.
    """

    def __init__(self, root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False, log=_log_stderr):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        names = modalities or list(self.manifest.get("tokens") or {})
        if not names:
            raise ShardError(f"{self.root}: the manifest lists no tokens; run fourm-fast tokenize {self.root}")
        n = self.manifest["num_samples"]
        tok = load_tokens(self.root, self.manifest, names)
        self.kinds, self.lengths = tok.kinds, tok.lengths
        self.arrays = {m: a.reshape(n, -1) if tok.kinds[m] == "image" else a for m, a in tok.arrays.items()}
        self.bad_files = [str(b) for b in tok.bad]
        self.good, self.skipped = resolve_bad(tok.bad, n, skip_bad, self.root, log)
        if len(self.good) == 0:
            raise ShardError(f"{self.root}: every sample has a bad token row")

    def __len__(self) -> int:
        return len(self.good)

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Tokens and sequence lengths of the given sample ids (not positions), as int64 tensors."""
        tokens = {m: torch.from_numpy(a[indices].astype(np.int64)) for m, a in self.arrays.items()}
        lengths = {m: torch.from_numpy(l[indices].astype(np.int64)) for m, l in self.lengths.items()}
        return tokens, lengths

    def __getitem__(self, i: int):
        tokens, lengths = self.batch(self.good[[i]])
        return {m: t[0] for m, t in tokens.items()}, {m: l[0] for m, l in lengths.items()}


# ---------------------------------------------------------------------------------------------
# The epoch plan: order, crop windows and flips as a pure function of (seed, epoch)


class EpochPlan:
    """Epoch e: order = a permutation of the good samples drawn from default_rng([seed, e]) (or their
    sorted order without shuffle), then per position a crop corner (y0, x0), uniform over
    [0, size - crop], and a flip with probability flip_prob, from the same generator. Every backend
    asks the plan, so they agree sample for sample."""

    def __init__(self, good: np.ndarray, batch_size: int, size: int, crop: int, flip_prob: float, shuffle: bool,
                 drop_last: bool, seed: int):
        self.good, self.batch_size, self.size, self.crop = good, batch_size, size, crop
        self.flip_prob, self.shuffle, self.drop_last, self.seed = flip_prob, shuffle, drop_last, seed
        n = len(good)
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        self._cached: tuple[int, tuple] | None = None

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sample ids int64 [n], y0 int64 [n], x0 int64 [n], flip bool [n]) in epoch order."""
        if self._cached is None or self._cached[0] != epoch:
            n = len(self.good)
            rng = np.random.default_rng([self.seed, epoch])
            order = self.good[rng.permutation(n)] if self.shuffle else self.good
            span = self.size - self.crop + 1
            y0 = rng.integers(0, span, n)
            x0 = rng.integers(0, span, n)
            flip = rng.random(n) < self.flip_prob
            self._cached = (epoch, (order, y0.astype(np.int64), x0.astype(np.int64), flip))
        return self._cached[1]

    def batch(self, epoch: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Batch j of epoch e: the same four arrays, [b] each (b < batch_size only for a last partial batch)."""
        if not 0 <= j < self.num_batches:
            raise IndexError(f"batch {j} of an epoch of {self.num_batches}")
        s = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return tuple(a[s] for a in self.epoch(epoch))


# ---------------------------------------------------------------------------------------------
# Loaders


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


class ShardBatches:
    """What both backends share: argument checks, the scan, token arrays and the epoch plan.

    Iterating gives one epoch of batches; the next iteration gives the next epoch (set_epoch to jump).
    """

    backend = "none"

    def __init__(self, root: str | Path, batch_size: int, *, images: list[str] | None = None,
                 tokens: list[str] | None = None, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 crop: int | None = None, flip_prob: float = 0.0, skip_bad: bool = False, verify: bool = True,
                 num_workers: int = 2, log=_log_stderr):
        self.root = Path(root)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        if not isinstance(flip_prob, (int, float)) or isinstance(flip_prob, bool) or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be a probability in [0, 1], got {flip_prob!r}")
        for name, value in (("images", images), ("tokens", tokens)):
            if isinstance(value, str):  # list("rgb") would be 'r', 'g', 'b'
                raise ValueError(f"{name} must be a list of modality names, got the string {value!r} "
                                 f"(write {name}=[{value!r}])")
        self.manifest = read_manifest(self.root)
        listed = self.manifest["modalities"]
        have_images = [m for m in listed if m in IMAGE_SPECS]
        self.images = list(have_images if images is None else images)
        for m in self.images:
            if m not in IMAGE_SPECS:
                raise ValueError(f"images: {m!r} is not an image modality this loader decodes ({sorted(IMAGE_SPECS)})")
            if m not in listed or m not in self.manifest["extensions"]:
                raise ValueError(f"images: {self.root} has no {m!r} (it has {listed})")
        if len(set(self.images)) != len(self.images):
            raise ValueError(f"images: repeated modality in {self.images}")
        self.size = self.manifest.get("size")
        if self.images and not isinstance(self.size, int):
            raise ShardError(f"{self.root / 'manifest.json'}: no integer 'size'; the loader needs the image side")
        if crop is None:
            self.crop = self.size or 0
        else:
            self.crop = _check_int("crop", crop, 1)
            if not self.images:
                raise ValueError("crop: no image modalities to crop")
            if self.crop > self.size:
                raise ValueError(f"crop={self.crop} is larger than the shards' {self.size}-pixel images")
        self.flip_prob = float(flip_prob)
        tokenized = list(self.manifest.get("tokens") or {})
        self.token_names = list(tokenized if tokens is None else tokens)
        if not self.images and not self.token_names:
            which = "images=[]" if images is not None else f"{self.root} has no image modalities"
            if tokens is not None:  # the caller asked for no tokens: tokenizing would not help
                raise ValueError(f"nothing to load: {which} and tokens=[] request no modality")
            raise ValueError(f"nothing to load: {which} and {self.root} has no tokens "
                             f"(run fourm-fast tokenize {self.root})")
        tok = load_tokens(self.root, self.manifest, self.token_names)
        self.token_arrays, self.token_lengths, self.token_kinds = tok.arrays, tok.lengths, tok.kinds
        bad = scan_images(self.root, self.manifest, self.images, verify) + tok.bad
        bad.sort(key=lambda b: b.index)
        self.verify = verify
        self.bad_files = [str(b) for b in bad]
        self.good, self.skipped = resolve_bad(bad, self.manifest["num_samples"], skip_bad, self.root, log)
        if len(self.good) < self.batch_size and drop_last:
            raise ValueError(f"batch_size {self.batch_size} > the {len(self.good)} usable samples of {self.root} "
                             f"with drop_last=True: the loader would yield no batch")
        if len(self.good) == 0:
            raise ShardError(f"{self.root}: no usable samples")
        self.plan = EpochPlan(self.good, self.batch_size, self.size or 0, self.crop, self.flip_prob, shuffle,
                              drop_last, self.seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.plan.num_batches

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (resume, or distinct epochs across restarts)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def image_path(self, m: str, index: int) -> Path:
        return self.root / f"{m}/{index:06d}.{self.manifest['extensions'][m]}"

    def decode_check(self, files: list[tuple[str, int]]) -> None:
        """Check each (modality, sample) file's header against the manifest and decode it with PIL;
        raise ShardError naming the first that fails (names the culprit when DALI rejects a batch)."""
        from PIL import Image

        for m, i in files:
            path = self.image_path(m, i)
            try:
                data = read_file(str(path))
            except OSError as e:
                raise ShardError(f"{path}: unreadable ({e})") from None
            rel = f"{m}/{i:06d}.{self.manifest['extensions'][m]}"
            reason = _check_image_file(m, rel, data, self.manifest, self.size, verify=False)
            if reason:
                raise ShardError(f"{path}: {reason}")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad images
                raise ShardError(f"{path}: not a decodable image ({type(e).__name__}: {e})") from None


def mirror_normals(normal, flip):
    """A left-right mirror negates the x component of a surface normal; without it the flipped map
    points the other way from the flipped rgb and depth (as 4M's NormalTransform flips it too).
    normal: (B, 3, H, W) torch tensor, flip: bool (B,); multiplies by -1, exact."""
    sign = 1.0 - 2.0 * flip.to(normal.device, normal.dtype)
    normal[:, 0] *= sign[:, None, None]
    return normal


def _convert(m: str, arr: np.ndarray) -> np.ndarray:
    """HWC stored values -> the batch's CHW values, the same maths as shards._decode."""
    arr = arr.transpose(2, 0, 1)
    if m == "depth":
        return arr.astype(np.float32) / 1000.0
    if m == "normal":
        return arr.astype(np.float32) / 127.5 - 1.0
    return np.array(arr, order="C")  # a copy: PIL's arrays are read-only


class _PILItems(torch.utils.data.Dataset):
    """item (sample id, y0, x0, flip) -> one sample's dict, PIL decode and numpy crop/flip."""

    def __init__(self, owner: "TorchLoader"):
        self.root, self.images, self.crop, self.size = owner.root, owner.images, owner.crop, owner.size
        self.ext = {m: owner.manifest["extensions"][m] for m in self.images}
        self.token_arrays, self.token_lengths = owner.token_arrays, owner.token_lengths

    def __getitem__(self, item):  # items come from the batch sampler, never by position
        from PIL import Image

        i, y0, x0, flip = item
        out = {"index": np.int64(i), "crop": np.array([y0, x0], np.int64), "flip": bool(flip), "images": {},
               "tokens": {m: a[i].astype(np.int64) for m, a in self.token_arrays.items()},
               "lengths": {m: np.int64(l[i]) for m, l in self.token_lengths.items()}}
        c = self.crop
        for m in self.images:
            path = self.root / f"{m}/{i:06d}.{self.ext[m]}"
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad images
                raise ShardError(f"{path}: not a decodable image ({type(e).__name__}: {e})") from None
            if arr.ndim == 2:
                arr = arr[:, :, None]
            want = (self.size, self.size, IMAGE_SPECS[m][0])
            if arr.shape != want or arr.dtype != (np.uint16 if IMAGE_SPECS[m][1] == 16 else np.uint8):
                raise ShardError(f"{path}: decodes to {arr.dtype} {arr.shape}, {m} needs {want}")
            arr = arr[y0:y0 + c, x0:x0 + c]
            if flip:
                arr = arr[:, ::-1]
            out["images"][m] = _convert(m, arr)
            if flip and m == "normal":
                out["images"][m][0] *= -1  # see mirror_normals
        return out


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: EpochPlan):
        self.plan, self.epoch = plan, 0

    def __len__(self) -> int:
        return self.plan.num_batches

    def __iter__(self):
        epoch = self.epoch  # fixed for this pass (it read self.epoch per batch)
        for j in range(self.plan.num_batches):
            idx, y0, x0, flip = self.plan.batch(epoch, j)
            yield list(zip(idx.tolist(), y0.tolist(), x0.tolist(), flip.tolist()))


class TorchLoader(ShardBatches):
    """backend "torch": PIL decode and numpy crop/flip per sample in DataLoader worker processes
    (num_workers of them, persistent; 0 decodes in this process). Same batches as DaliLoader."""

    backend = "torch"

    def __init__(self, root, batch_size, **kw):
        super().__init__(root, batch_size, **kw)
        self._sampler = _PlanSampler(self.plan)
        self._loader = torch.utils.data.DataLoader(_PILItems(self), batch_sampler=self._sampler,
                                                   num_workers=self.num_workers,
                                                   persistent_workers=self.num_workers > 0)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        self._sampler.epoch = epoch
        # The DataLoader (persistent workers) keeps one iterator and resets it when iteration
        # starts again, so an overlapping pass would take over this one's batches silently.
        me = self._active = object()
        for batch in self._loader:
            yield batch
            if self._active is not me:  # checked on resuming, before the shared iterator is read again
                raise RuntimeError("another iteration over this TorchLoader started; iterate one epoch at a time")


def build_loader(root: str | Path, batch_size: int, backend: str = "torch", shuffle: bool = True, seed: int = 0,
                 num_workers: int = 2, drop_last: bool = True, *, images: list[str] | None = None,
                 tokens: list[str] | None = None, crop: int | None = None, flip_prob: float = 0.0,
                 skip_bad: bool = False, verify: bool = True, device_id: int | None = None, log=_log_stderr):
    """Batches of images and tokens from a shard folder; both backends yield the same dicts:

      images:  {m: [B, C, crop, crop]}  rgb/semseg/edges uint8, depth float32 metres, normal float32 in [-1, 1]
      tokens:  {m: int64 [B, g, g] grids | int64 [B, L] text ids}   (describe the un-augmented image)
      lengths: {m: int64 [B]} for text modalities
      index:   int64 [B] sample ids;  crop: int64 [B, 2] window corner (y0, x0);  flip: bool [B]

    backend "dali": a DALI pipeline (fourm_fast.data.dali.DaliLoader); num_workers DALI threads
    (at least 1); device_id=None decodes on the CPU, device_id=k decodes with device="mixed" and
    leaves images on cuda:k. backend "torch": PIL in num_workers DataLoader processes.
    images=None: every image modality of the manifest; tokens=None: every tokenized modality; [] for
    none. crop=None: the full image. flip_prob: chance of a horizontal flip per sample. skip_bad and
    verify: see this module's docstring.
    """
    if backend not in ("torch", "dali"):
        raise ValueError(f"backend must be 'torch' or 'dali', got {backend!r}")
    kw = dict(images=images, tokens=tokens, shuffle=shuffle, seed=seed, drop_last=drop_last, crop=crop,
              flip_prob=flip_prob, skip_bad=skip_bad, verify=verify, num_workers=num_workers, log=log)
    if backend == "torch":
        if device_id is not None:
            raise ValueError("device_id is for backend='dali' (GPU decoding); the torch backend decodes on the CPU")
        return TorchLoader(root, batch_size, **kw)
    try:
        from .dali import DaliLoader
    except ImportError as e:
        raise ImportError(f"build_loader(backend='dali') needs NVIDIA DALI, which did not import ({e}); install "
                          "it with `pip install nvidia-dali-cuda130` or use backend='torch'") from None
    return DaliLoader(root, batch_size, device_id=device_id, **kw)
