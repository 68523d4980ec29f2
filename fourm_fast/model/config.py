"""FourM configuration: transformer sizes and the modality table (4M's modality info, reduced to
what the model needs)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real


def _check_int(where: str, value, lo: int) -> None:
    # bool is an int subclass: True would pass as 1
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{where} must be an int, got {value!r}")
    if value < lo:
        raise ValueError(f"{where} must be >= {lo}, got {value!r}")


@dataclass(frozen=True)
class ModalityConfig:
    """One modality as the model sees it.

    kind "image": a token grid of ``grid * grid`` tokens with 2D sin-cos positions.
    kind "sequence": up to ``max_length`` tokens with 1D sin-cos positions (4M's captions and boxes
    as text; the batch buffer holds 2 (max_length + 1) slots as 4M's masking writes them).
    """

    name: str
    kind: str
    vocab_size: int
    grid: int = 14             # image: tokens per side (224 px / patch 16)
    max_length: int = 256      # sequence: max tokens
    max_sincos_pos_emb: int = 512
    padding_idx: int = 0

    def __post_init__(self):
        if self.kind not in ("image", "sequence"):
            raise ValueError(f"modality {self.name!r}: kind must be 'image' or 'sequence', got {self.kind!r}")
        where = f"modality {self.name!r}:"
        _check_int(f"{where} vocab_size", self.vocab_size, 1)
        if self.kind == "image":  # the fields the kind reads; the others keep their unused defaults
            _check_int(f"{where} grid", self.grid, 1)
        else:
            _check_int(f"{where} max_length", self.max_length, 1)
            _check_int(f"{where} max_sincos_pos_emb", self.max_sincos_pos_emb, 1)
            _check_int(f"{where} padding_idx", self.padding_idx, 0)
            if self.padding_idx >= self.vocab_size:
                raise ValueError(f"{where} padding_idx {self.padding_idx} is outside the vocabulary of {self.vocab_size}")
        if self.kind == "sequence" and self.max_length > self.max_sincos_pos_emb:
            raise ValueError(f"modality {self.name!r}: max_length {self.max_length} exceeds max_sincos_pos_emb {self.max_sincos_pos_emb}")

    @property
    def num_tokens(self) -> int:
        """Tokens of the modality: the grid, or the sequence's max length."""
        return self.grid * self.grid if self.kind == "image" else self.max_length

    @property
    def buffer_size(self) -> int:
        return self.num_tokens if self.kind == "image" else 2 * (self.max_length + 1)


@dataclass(frozen=True)
class FourMConfig:
    dim: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    gated_mlp: bool = True           # SwiGLU, hidden int(2 * mlp_ratio * dim / 3)
    act: str = "silu"                # "silu" or "gelu"
    qk_norm: bool = False
    decoder_causal_mask: bool = False
    decoder_sep_mask: bool = True
    num_register_tokens: int = 0
    modalities: tuple[ModalityConfig, ...] = field(default_factory=tuple)
    domains_in: tuple[str, ...] = ()
    domains_out: tuple[str, ...] = ()

    def __post_init__(self):
        _check_int("dim", self.dim, 1)
        _check_int("num_heads", self.num_heads, 1)
        # depth 0 builds and runs (as in ml-4m, whose blocks are range(depth)): embeddings only
        _check_int("encoder_depth", self.encoder_depth, 0)
        _check_int("decoder_depth", self.decoder_depth, 0)
        _check_int("num_register_tokens", self.num_register_tokens, 0)
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, Real):
            raise TypeError(f"mlp_ratio must be a number, got {self.mlp_ratio!r}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_hidden >= 1):
            raise ValueError(f"mlp_ratio must be finite and give an MLP of at least 1 unit, got {self.mlp_ratio!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.act not in ("silu", "gelu"):
            raise ValueError(f"act must be 'silu' or 'gelu', got {self.act!r}")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names: {names}")
        # the fixed sin-cos position tables: 2D (images) splits dim in 4, 1D (sequences) in 2
        for kind, k in (("image", 4), ("sequence", 2)):
            if self.dim % k and any(m.kind == kind for m in self.modalities):
                raise ValueError(f"dim {self.dim} must be divisible by {k} for the sin-cos positions of {kind} modalities")
        unknown = [d for d in (*self.domains_in, *self.domains_out) if d not in names]
        if unknown:
            raise ValueError(f"domains {unknown} are not among the modalities {names}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.dim * self.mlp_ratio)
        return int(2 * hidden / 3) if self.gated_mlp else hidden

    def modality(self, name: str) -> ModalityConfig:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"unknown modality {name!r}; the model has {[m.name for m in self.modalities]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = [asdict(m) for m in self.modalities]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FourMConfig":
        d = dict(d)
        d["modalities"] = tuple(ModalityConfig(**m) for m in d.get("modalities", ()))
        d["domains_in"] = tuple(d.get("domains_in", ()))
        d["domains_out"] = tuple(d.get("domains_out", ()))
        return cls(**d)


# 4M's sizes (ml-4m fm_*_swiglu_nobias): dim, encoder + decoder depth, heads.
PRESETS = {
    "tiny": dict(dim=384, encoder_depth=6, decoder_depth=6, num_heads=6),
    "B": dict(dim=768, encoder_depth=12, decoder_depth=12, num_heads=12),
    "L": dict(dim=1024, encoder_depth=24, decoder_depth=24, num_heads=16),
    "XL": dict(dim=2048, encoder_depth=24, decoder_depth=24, num_heads=32),
}


def preset(name: str, modalities, domains_in=None, domains_out=None, **overrides) -> FourMConfig:
    """A preset's sizes with the given modalities (all of them in and out unless told)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    mods = tuple(modalities)
    names = tuple(m.name for m in mods)
    cfg = FourMConfig(**PRESETS[name], modalities=mods, domains_in=tuple(domains_in or names),
                      domains_out=tuple(domains_out or names))
    return replace(cfg, **overrides) if overrides else cfg
