"""Per-modality embeddings with 4M's parameter names (token_emb, mod_emb, pos_emb, to_logits), and
the fixed sin-cos position tables."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModalityConfig


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """(1, length, dim): sin of position * omega in the first half, cos in the second (MoCo v3, 1D)."""
    if dim % 2:
        raise ValueError(f"1D sin-cos positions need an even dim, got {dim}")
    pos = torch.arange(length, dtype=torch.float32)
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angle = torch.outer(pos, omega)
    return torch.cat([angle.sin(), angle.cos()], dim=1)[None]


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """(1, h * w, dim): sin/cos of the first grid axis, then of the second (MoCo v3's layout, with
    the flattening order 4M uses: meshgrid(w, h, indexing="ij"))."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need dim divisible by 4, got {dim}")
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    aw = torch.outer(gw.reshape(-1), omega)
    ah = torch.outer(gh.reshape(-1), omega)
    return torch.cat([aw.sin(), aw.cos(), ah.sin(), ah.cos()], dim=1)[None]


def position_table(m: ModalityConfig, dim: int) -> Tensor:
    if m.kind == "image":
        return sincos_2d(m.grid, m.grid, dim)
    return sincos_1d(m.max_sincos_pos_emb, dim)[:, : m.max_length]


class EncoderEmbedding(nn.Module):
    """token_emb (vocab, dim), mod_emb (1, 1, dim), pos_emb buffer (1, positions, dim)."""

    def __init__(self, m: ModalityConfig, dim: int):
        super().__init__()
        self.modality = m
        self.register_buffer("pos_emb", position_table(m, dim))
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        pad = m.padding_idx if m.kind == "sequence" else None
        self.token_emb = nn.Embedding(m.vocab_size, dim, padding_idx=pad)


class DecoderEmbedding(EncoderEmbedding):
    """Adds to_logits (vocab x dim, no bias), tied to token_emb as in 4M's released models."""

    def __init__(self, m: ModalityConfig, dim: int, tie_logits: bool = True):
        super().__init__(m, dim)
        self.to_logits = nn.Linear(dim, m.vocab_size, bias=False)
        if tie_logits:
            self.to_logits.weight = self.token_emb.weight
