"""What a generation knows so far, and the model inputs built from it.

Each modality of the state holds ``tokens (B, N) int64`` and ``known (B, N) bool``: an image's
token grid with the positions given or generated so far; a sequence's ids with ``known`` a prefix.
The encoder sees every known token; a sequence with nothing known is shown as its first sentinel
[S_1] alone, as 4M's empty_seq_modality does for targets and for conditions dropped by guidance.
"""
from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Slots:
    """The fields of a FourMBatch that FourM.encode / FourM.decode read."""

    enc_ids: Tensor | None = None
    enc_modality: Tensor | None = None
    enc_position: Tensor | None = None
    enc_valid: Tensor | None = None
    dec_ids: Tensor | None = None
    dec_modality: Tensor | None = None
    dec_position: Tensor | None = None
    dec_valid: Tensor | None = None
    dec_segment: Tensor | None = None
    dec_rank: Tensor | None = None
    dec_limit: Tensor | None = None


_UIDS = itertools.count()


class GenerationState:
    """Tokens and known masks per modality for a batch of B samples on one device."""

    def __init__(self, model, batch_size: int, device: torch.device | str = "cpu"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")  # 2.5 was taken
        batch_size = int(batch_size)
        self.cfg = model.cfg
        self.index = {n: i for i, n in enumerate(model.modalities)}
        self.B = batch_size
        self.device = torch.device(device)
        self.tokens: dict[str, Tensor] = {}
        self.known: dict[str, Tensor] = {}
        self.uid = next(_UIDS)  # with version, keys the encoder cache (never reused, unlike id())
        self.version = 0  # bumped on every change

    def _width(self, name: str) -> int:
        if name not in self.index:
            raise KeyError(f"unknown modality {name!r}; the model has {list(self.index)}")
        return self.cfg.modality(name).num_tokens

    def add_empty(self, name: str) -> None:
        N = self._width(name)
        self.tokens[name] = torch.zeros(self.B, N, dtype=torch.int64, device=self.device)
        self.known[name] = torch.zeros(self.B, N, dtype=torch.bool, device=self.device)
        self.version += 1

    def _per_sample(self, name: str, value, g: int, what: str) -> Tensor:
        """(1 or B, N) from (N,), (g, g), (1 or B, N) or (1 or B, g, g)."""
        N = g * g
        x = torch.as_tensor(value)
        shape = tuple(x.shape)
        if x.dim() == 1 or (x.dim() == 2 and shape == (g, g)):  # one sample
            x = x.reshape(1, *shape)
        if x.dim() == 3 and tuple(x.shape[1:]) == (g, g):
            x = x.reshape(x.shape[0], N)
        if x.dim() != 2 or x.shape[1] != N or x.shape[0] not in (1, self.B):
            raise ValueError(f"{name}: {what} must be (B, {N}) or (B, {g}, {g}) with B = {self.B} (or 1 sample: ({N},), "
                             f"({g}, {g})), got shape {shape}")
        return x.to(self.device)

    def set_image(self, name: str, tokens: Tensor, known: Tensor | None = None) -> None:
        """tokens: (B, N) or (B, g, g) ids, or one sample ((N,) or (g, g)) for every sample; known:
        which of them are given (default all), in any of the same shapes."""
        m = self.cfg.modality(name)
        if m.kind != "image":
            raise ValueError(f"{name} is a sequence modality; use set_sequence")
        g = m.grid
        raw = torch.as_tensor(tokens)
        if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
            raise ValueError(f"{name}: tokens must be integer ids, got {raw.dtype}")
        t = self._per_sample(name, raw, g, "tokens").to(torch.int64)
        if bool(((t < 0) | (t >= m.vocab_size)).any()):
            raise ValueError(f"{name}: token ids outside [0, {m.vocab_size})")
        k = torch.ones_like(t, dtype=torch.bool) if known is None else self._per_sample(name, known, g, "known").to(torch.bool)
        self.tokens[name] = t.expand(self.B, -1).clone()
        self.known[name] = k.expand(self.B, -1).clone()
        self.version += 1

    def set_sequence(self, name: str, ids) -> None:
        """ids: one sequence of token ids for every sample, or B of them (lists, or a 1-D / 2-D
        tensor or array), EOS included as the tokenizer writes it and no padding (every id given is
        shown to the encoder); longer than the modality's max_length is an error."""
        m = self.cfg.modality(name)
        if m.kind != "sequence":
            raise ValueError(f"{name} is an image modality; use set_image")
        if isinstance(ids, (Tensor, np.ndarray)):
            if ids.ndim not in (1, 2):
                raise ValueError(f"{name}: a 1-D sequence or a 2-D batch of them, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        # 0-d tensors and numpy scalars are ids; lists, tuples and 1-D arrays are sequences
        ids = [r.item() if isinstance(r, (Tensor, np.ndarray, np.generic)) and np.ndim(r) == 0 else r for r in ids]
        nested = [isinstance(r, (list, tuple, Tensor, np.ndarray)) for r in ids]
        if any(nested) and not all(nested):
            raise ValueError(f"{name}: give one sequence of ids or a list of sequences, not a mix")
        if ids and all(nested):
            rows = [list(r.tolist() if isinstance(r, (Tensor, np.ndarray)) else r) for r in ids]
        else:
            rows = [ids] * self.B
        if len(rows) != self.B:
            raise ValueError(f"{name}: {len(rows)} sequences for a batch of {self.B}")
        t = torch.zeros(self.B, m.max_length, dtype=torch.int64)
        k = torch.zeros(self.B, m.max_length, dtype=torch.bool)
        for b, r in enumerate(rows):
            if len(r) > m.max_length:
                raise ValueError(f"{name}: sequence of {len(r)} tokens exceeds max_length {m.max_length}")
            if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in r):
                raise ValueError(f"{name}: token ids must be integers, got {r[:8]}")
            if any(not 0 <= int(x) < m.vocab_size for x in r):
                raise ValueError(f"{name}: token ids outside [0, {m.vocab_size})")
            t[b, : len(r)] = torch.tensor([int(x) for x in r], dtype=torch.int64)
            k[b, : len(r)] = True
        self.tokens[name] = t.to(self.device)
        self.known[name] = k.to(self.device)
        self.version += 1

    def commit(self, name: str, positions: Tensor, values: Tensor, mask: Tensor) -> None:
        """tokens[b, positions[b, j]] = values[b, j] where mask[b, j]."""
        t, k = self.tokens[name], self.known[name]
        N = t.shape[1]
        pos = torch.where(mask, positions, N)  # unselected entries land in a spare column
        t_ext = torch.cat([t, t.new_zeros(self.B, 1)], 1).scatter_(1, pos, values)
        k_ext = torch.cat([k, k.new_zeros(self.B, 1)], 1).scatter_(1, pos, torch.ones_like(mask))
        self.tokens[name], self.known[name] = t_ext[:, :N].contiguous(), k_ext[:, :N].contiguous()
        self.version += 1

    def sequence(self, name: str, b: int) -> list[int]:
        return self.tokens[name][b][self.known[name][b]].tolist()

    # ---- model inputs -------------------------------------------------------------------------
    def encoder_slots(self, model, passes: list[set[str]], s1_ids: dict[str, int]) -> Slots:
        """Encoder slots of P passes stacked on the batch axis ([P * B, Ne]): pass p sees the known
        tokens of the modalities in passes[p]; a sequence it does not see, or with nothing known,
        appears as [S_1] alone. Slots are compacted to the longest pass (one host sync)."""
        ids, mods, pos, valid = [], [], [], []
        for name in model.modalities:
            if name not in self.tokens or name not in model.encoder_embeddings:
                continue
            m = self.cfg.modality(name)
            t, k = self.tokens[name], self.known[name]
            N = t.shape[1]
            arange = torch.arange(N, device=self.device).expand(self.B, N)
            pid, pvalid = [], []
            for vis in passes:
                shown = name in vis
                if m.kind == "sequence":
                    empty = ~k.any(1, keepdim=True) if shown else torch.ones(self.B, 1, dtype=torch.bool, device=self.device)
                    if bool(empty.any()) and name not in s1_ids:
                        raise ValueError(f"{name}: an empty sequence is shown as its sentinel [S_1], but no sentinel ids "
                                         f"were given for it (Generator(sentinel_ids=...))")
                    first = arange == 0
                    v = (k if shown else torch.zeros_like(k)) | (empty & first)
                    i = torch.where(empty & first, s1_ids.get(name, 0), t)
                else:
                    v = k if shown else torch.zeros_like(k)
                    i = t
                pid.append(i)
                pvalid.append(v)
            ids.append(torch.cat(pid))
            valid.append(torch.cat(pvalid))
            pos.append(arange.repeat(len(passes), 1))
            mods.append(torch.full_like(ids[-1], self.index[name]))
        if not ids:
            raise ValueError("no encoder inputs: the state holds no modality the model encodes")
        ids, mods, pos, valid = (torch.cat(x, 1) for x in (ids, mods, pos, valid))
        n = max(int(valid.sum(1).max()), 1)
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :n]
        return Slots(enc_ids=ids.gather(1, order), enc_modality=mods.gather(1, order), enc_position=pos.gather(1, order),
                     enc_valid=valid.gather(1, order))
