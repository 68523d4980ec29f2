"""Token shards as training data: the arrays `fourm-fast tokenize` writes, validated, and a loader.

DIR/tokens/<image modality>.npy    int16 [N, g, g] VQ token grids
DIR/tokens/<text modality>.npy     int32 [N, L] WordPiece ids, 0-padded, EOS included
DIR/tokens/<text modality>.lengths.npy
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .shards import ShardError, read_manifest


class TokenShards(torch.utils.data.Dataset):
    """Per sample: image modality -> int64 [g * g]; text modality -> (int64 [L] ids, length)."""

    def __init__(self, root: str | Path, modalities: list[str] | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        entries = self.manifest.get("tokens")
        if not entries:
            raise ShardError(f"{self.root}: the manifest lists no tokens; run fourm-fast tokenize {self.root}")
        names = modalities or list(entries)
        unknown = [m for m in names if m not in entries]
        if unknown:
            raise ShardError(f"{self.root}: no tokens for {unknown} (tokenized: {list(entries)})")
        n = self.manifest["num_samples"]
        self.arrays, self.lengths, self.kinds = {}, {}, {}
        for m in names:
            path = self.root / "tokens" / f"{m}.npy"
            if not path.exists():
                raise ShardError(f"{path}: missing (listed in the manifest)")
            try:
                arr = np.load(path)
            except (ValueError, OSError) as e:
                raise ShardError(f"{path}: unreadable ({e})") from None
            want = tuple(entries[m]["shape"])
            if arr.shape != want:
                raise ShardError(f"{path}: shape {arr.shape}, the manifest says {want}")
            if arr.shape[0] != n:
                raise ShardError(f"{path}: {arr.shape[0]} rows for {n} samples")
            if arr.ndim == 3:
                if arr.dtype != np.int16:
                    raise ShardError(f"{path}: dtype {arr.dtype}, expected int16 token grids")
                self.kinds[m] = "image"
                self.arrays[m] = arr.reshape(n, -1)
            else:
                if arr.dtype != np.int32:
                    raise ShardError(f"{path}: dtype {arr.dtype}, expected int32 token ids")
                lpath = self.root / "tokens" / f"{m}.lengths.npy"
                if not lpath.exists():
                    raise ShardError(f"{lpath}: missing")
                self.kinds[m] = "sequence"
                self.arrays[m] = arr
                self.lengths[m] = np.load(lpath)
            if (self.arrays[m] < 0).any() or self.arrays[m].max() >= entries[m]["num_codes"]:
                raise ShardError(f"{path}: token ids outside [0, {entries[m]['num_codes']})")

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Tokens and sequence lengths of the given samples, as int64 tensors."""
        tokens = {m: torch.from_numpy(a[indices].astype(np.int64)) for m, a in self.arrays.items()}
        lengths = {m: torch.from_numpy(l[indices].astype(np.int64)) for m, l in self.lengths.items()}
        return tokens, lengths

    def __getitem__(self, i: int):
        tokens, lengths = self.batch(np.array([i]))
        return {m: t[0] for m, t in tokens.items()}, {m: l[0] for m, l in lengths.items()}


def build_loader(root: str | Path, batch_size: int, backend: str = "torch", shuffle: bool = True, seed: int = 0,
                 num_workers: int = 0, drop_last: bool = True):
    """Batches of token dicts. backend "torch": a DataLoader over TokenShards."""
    if backend == "dali":
        raise NotImplementedError("build_loader(backend='dali') is not implemented yet: the DALI image-decode "
                                  "pipeline is still to come; use backend='torch'")
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'dali', got {backend!r}")
    ds = TokenShards(root)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=num_workers, drop_last=drop_last)
