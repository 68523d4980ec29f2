"""Training-time token-budget sampler: 4M's multimodal input/target masking as batched ops.

    specs = fourm7_specs()
    sampler = TokenBudgetSampler(specs, 128, 128, FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG)
    layout = sampler.sample(batch_size=256, seed=step)
    buffer = layout.build_buffer(tokens, sentinel_ids, pad_id)   # [B, layout.buffer_size]
    enc_tokens = buffer.gather(1, layout.slots.enc_index)         # one gather, no argsort

Per sample the sampler picks a mixture component, draws Dirichlet input and target budgets and
apportions them as 4M does (``fourm_fast/reference/masking.py`` restates 4M's algorithm), picks
which image tokens are inputs and which are targets (uniform, disjoint), and span-masks the
sequence modalities (captions, boxes as text) with sentinel tokens. The draws use Philox keyed by
(seed, offset, sample), so a seed gives the same batch on CPU and CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .ops.masking import KEEP_MODES, MIN_POSITIVE_ALPHA, SPAN_PAD, Layout, sample_budgets, span_mask, token_layout

__all__ = [
    "ModalitySpec", "TokenBudgetSampler", "Budgets", "TokenLayout", "to_ml4m_batch",
    "fourm7_specs", "FOURM7_ALPHAS_IN", "FOURM7_ALPHAS_TG", "fourm7_sampler",
]


@dataclass(frozen=True)
class ModalitySpec:
    """One modality as 4M's modality info describes it.

    num_tokens: the token grid size for an image-like modality (196 at 224 px / patch 16), the
        maximum token count for a sequence (``max_tokens``).
    keep: for sequences, 4M's keep-probability scheme ("random", "all" or "binary"), one name for
        every mixture component or one per component.
    """

    name: str
    kind: str = "image"
    num_tokens: int = 196
    keep: str | tuple[str, ...] = "random"

    def __post_init__(self):
        if self.kind not in ("image", "sequence"):
            raise ValueError(f"ModalitySpec {self.name!r}: kind must be 'image' or 'sequence', got {self.kind!r}")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"ModalitySpec {self.name!r}: num_tokens must be a positive int, got {self.num_tokens!r}")
        keeps = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep)
        bad = [k for k in keeps if k not in KEEP_MODES]
        if bad or not keeps:
            raise ValueError(f"ModalitySpec {self.name!r}: keep must be among {sorted(KEEP_MODES)}, got {self.keep!r}")

    @property
    def buffer_size(self) -> int:
        """Slots in the per-sample token buffer: the grid, or 4M's 2 (max_tokens + 1) for a sequence."""
        return self.num_tokens if self.kind == "image" else 2 * (self.num_tokens + 1)


@dataclass
class Budgets:
    modalities: list[str]
    input: Tensor      # [B, M] int32
    target: Tensor     # [B, M] int32
    component: Tensor  # [B] int32


@dataclass
class TokenLayout:
    """A sampled batch layout. ``slots`` holds the encoder / decoder slot tensors (see ops.masking.Layout)."""

    modalities: list[str]
    specs: list[ModalitySpec]
    offsets: list[int]
    buffer_size: int
    budgets: Budgets
    slots: Layout
    sequence_source: dict[str, Tensor] = field(default_factory=dict)  # [B, 2 (max + 1)] int32, CPU
    sequence_input: dict[str, Tensor] = field(default_factory=dict)   # [B] input lengths
    sequence_target: dict[str, Tensor] = field(default_factory=dict)  # [B] target lengths

    @property
    def batch_size(self) -> int:
        return self.slots.enc_index.shape[0]

    def sequence_tokens(self, name: str, ids: Tensor, sentinel_ids: Sequence[int] | Tensor, pad_id: int) -> Tensor:
        """The span-masked buffer of sequence modality ``name`` in 4M's layout (int64 [B, 2 (max + 1)])."""
        source = self.sequence_source[name]
        B = source.shape[0]
        if ids.dim() != 2 or ids.shape[0] != B:
            raise ValueError(f"{name}: token ids must be [batch={B}, length], got {tuple(ids.shape)}")
        sentinels = torch.as_tensor(sentinel_ids, dtype=torch.int64)
        if sentinels.dim() != 1:
            raise ValueError("sentinel_ids must be a 1-D sequence (entry s is the id of sentinel [S_s])")
        is_token = source >= 0
        is_sentinel = (source < 0) & (source != SPAN_PAD)
        sentinel_no = torch.where(is_sentinel, -source, 0).long()
        top = int(sentinel_no.max()) if source.numel() else 0
        if top >= sentinels.numel():
            raise ValueError(f"{name}: span masking used sentinel [S_{top}] but only {sentinels.numel()} sentinel ids were given")
        ids = ids.to(device="cpu", dtype=torch.int64)
        if ids.shape[1] == 0:
            if is_token.any():
                raise ValueError(f"{name}: token ids are empty but the layout refers to tokens")
            ids = torch.zeros(B, 1, dtype=torch.int64)
        if source.numel() and int(source.max()) >= ids.shape[1]:
            raise ValueError(f"{name}: the layout refers to token {int(source.max())} but ids have length {ids.shape[1]}")
        tok = ids.gather(1, source.clamp(min=0).long())
        sen = sentinels[sentinel_no]
        out = torch.where(is_token, tok, torch.where(is_sentinel, sen, torch.full_like(tok, pad_id)))
        return out

    def build_buffer(self, tokens: Mapping[str, Tensor], sentinel_ids: Sequence[int] | Tensor | None = None,
                     pad_id: int = 0) -> Tensor:
        """Concatenate every modality's tokens into the per-sample buffer the slot indices point into.

        tokens: image modality -> [B, num_tokens] token ids; sequence modality -> [B, L] ids (the
        lengths given to ``sample``); sentinel_ids / pad_id are needed when sequences are present.
        """
        missing = [n for n in self.modalities if n not in tokens]
        unknown = [n for n in tokens if n not in self.modalities]
        if missing or unknown:
            raise ValueError(f"build_buffer: missing modalities {missing}, unknown modalities {unknown}")
        device = self.slots.enc_index.device
        parts = []
        for spec in self.specs:
            t = tokens[spec.name]
            if spec.kind == "image":
                if t.dim() != 2 or t.shape != (self.batch_size, spec.num_tokens):
                    raise ValueError(f"{spec.name}: expected tokens [{self.batch_size}, {spec.num_tokens}], got {tuple(t.shape)}")
                parts.append(t.to(device=device, dtype=torch.int64))
            else:
                if sentinel_ids is None:
                    raise ValueError("build_buffer: sentinel_ids are required for sequence modalities")
                parts.append(self.sequence_tokens(spec.name, t, sentinel_ids, pad_id).to(device))
        return torch.cat(parts, dim=1)

    def encoder_tokens(self, buffer: Tensor) -> Tensor:
        return buffer.gather(1, self.slots.enc_index)

    def decoder_tokens(self, buffer: Tensor) -> Tensor:
        return buffer.gather(1, self.slots.dec_index)

    def attention_metadata(self) -> dict[str, dict[str, Tensor]]:
        """Keyword arguments of ``masked_attention`` for the encoder, decoder self and cross attention."""
        s = self.slots
        return {
            "encoder": {"k_valid": s.enc_valid},
            "decoder_self": {"k_valid": s.dec_valid, "q_segment": s.dec_segment, "k_segment": s.dec_segment,
                             "q_limit": s.dec_limit, "k_rank": s.dec_rank},
            "decoder_cross": {"k_valid": s.enc_valid},
        }


def _token_range(value, what: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int or an inclusive (min, max) pair, got {value!r}")
    if isinstance(value, int):
        lo = hi = value
    else:
        try:
            lo, hi = (int(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be an int or an inclusive (min, max) pair, got {value!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"{what} must satisfy 0 <= min <= max, got ({lo}, {hi})")
    return lo, hi


class TokenBudgetSampler:
    """4M's input/target token sampler over a fixed modality set, batched.

    alphas_in / alphas_tg: modality name -> list of per-component Dirichlet concentrations (a
    single number means one component); alpha 0 means the modality never gets tokens in that
    component (4M clamps it to 1e-9). weights: mixture weights (uniform when None).
    num_input_tokens / num_target_tokens: an int or an inclusive (min, max) range; every layout
    has max(range) encoder / decoder slots, unused ones marked invalid.
    """

    def __init__(self, specs: Sequence[ModalitySpec], num_input_tokens, num_target_tokens,
                 alphas_in: Mapping[str, Sequence[float] | float], alphas_tg: Mapping[str, Sequence[float] | float],
                 weights: Sequence[float] | None = None, device: str | torch.device = "cpu"):
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("TokenBudgetSampler: no modalities")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"TokenBudgetSampler: duplicate modality names in {names}")
        self.modalities = names
        self.device = torch.device(device)
        self.input_range = _token_range(num_input_tokens, "num_input_tokens")
        self.target_range = _token_range(num_target_tokens, "num_target_tokens")
        a_in = self._alpha_table(alphas_in, "alphas_in")
        a_tg = self._alpha_table(alphas_tg, "alphas_tg")
        if a_in.shape[0] != a_tg.shape[0]:
            raise ValueError(f"alphas_in has {a_in.shape[0]} mixture components, alphas_tg {a_tg.shape[0]}")
        self.num_components = a_in.shape[0]
        if weights is not None:
            w64 = torch.tensor([float(x) for x in weights], dtype=torch.float64)
            if w64.numel() != self.num_components:
                raise ValueError(f"weights has {w64.numel()} entries for {self.num_components} mixture components")
            if not torch.isfinite(w64).all() or (w64 < 0).any() or w64.sum() <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w64.tolist()}")
            # normalised in float64: weights whose float32 sum overflows (2e38 + 2e38) or is
            # subnormal drew the last component, even one of weight 0
            w = (w64 / w64.sum()).to(torch.float32)
        for spec in self.specs:
            if spec.kind == "sequence" and not isinstance(spec.keep, str) and len(spec.keep) != self.num_components:
                raise ValueError(f"{spec.name}: keep has {len(spec.keep)} entries for {self.num_components} components")
        self._check_feasible(a_in, a_tg)
        self.size = torch.tensor([s.num_tokens for s in self.specs], dtype=torch.int32, device=self.device)
        self.is_image = torch.tensor([s.kind == "image" for s in self.specs], dtype=torch.bool, device=self.device)
        self.alpha_in = a_in.to(self.device)
        self.alpha_tg = a_tg.to(self.device)
        self.weights = None if weights is None else w.to(self.device)
        self.keep_table = torch.tensor(
            [[KEEP_MODES[s.keep if isinstance(s.keep, str) else s.keep[c]] for s in self.specs]
             for c in range(self.num_components)], dtype=torch.int32)
        widths = [s.buffer_size for s in self.specs]
        self.offsets = [sum(widths[:m]) for m in range(len(widths))]
        self.buffer_size = sum(widths)

    def _alpha_table(self, alphas: Mapping[str, Sequence[float] | float], what: str) -> Tensor:
        unknown = [k for k in alphas if k not in self.modalities]
        missing = [n for n in self.modalities if n not in alphas]
        if unknown or missing:
            raise ValueError(f"{what}: unknown modalities {unknown}, missing modalities {missing} (known: {self.modalities})")
        rows = [[float(alphas[n])] if isinstance(alphas[n], (int, float)) else [float(x) for x in alphas[n]]
                for n in self.modalities]
        counts = {len(r) for r in rows}
        if len(counts) != 1:
            raise ValueError(f"{what}: every modality needs the same number of mixture components, got {dict(zip(self.modalities, map(len, rows)))}")
        table = torch.tensor(rows, dtype=torch.float32).T.contiguous()  # [C, M]
        if not torch.isfinite(table).all() or (table < 0).any():
            raise ValueError(f"{what}: alphas must be finite and >= 0, got {dict(zip(self.modalities, rows))}")
        if ((table > 0) & (table < MIN_POSITIVE_ALPHA)).any():  # the op's limit (log-gamma draws overflow below it)
            raise ValueError(f"{what}: alphas must be 0 or at least {MIN_POSITIVE_ALPHA:g}, got {dict(zip(self.modalities, rows))}")
        dead = [c for c in range(table.shape[0]) if not (table[c] > 0).any()]
        if dead:
            raise ValueError(f"{what}: mixture component(s) {dead} have all-zero alphas")
        return table

    def _check_feasible(self, a_in: Tensor, a_tg: Tensor) -> None:
        # A component whose modalities hold fewer tokens than asked leaves slots invalid, as 4M's
        # caps do (4M-7's rgb -> all at 256 inputs: rgb has 196); more tokens than all modalities
        # together hold is a configuration error.
        total = sum(s.num_tokens for s in self.specs)
        for what, (lo, hi) in (("input", self.input_range), ("target", self.target_range)):
            if hi > total:
                raise ValueError(f"budgets cannot be met: up to {hi} {what} tokens but the modalities "
                                 f"{self.modalities} hold only {total}")

    def budgets(self, batch_size: int, seed: int, offset: int = 0) -> Budgets:
        """Input and target budgets [B, M] (after 4M's apportioning and caps) and the components."""
        component, inp, tgt = sample_budgets(batch_size, self.alpha_in, self.alpha_tg, self.weights, self.size,
                                             self.is_image, self.input_range, self.target_range, seed, offset)
        return Budgets(self.modalities, inp, tgt, component)

    def sample(self, batch_size: int, seed: int, lengths: Mapping[str, Tensor] | None = None,
               offset: int = 0) -> TokenLayout:
        """Budgets, span masks and the gather layout of one batch.

        lengths: sequence modality -> [B] token counts of each sample's sequence (EOS included, as
        4M appends it); a sequence without lengths is taken to be full (num_tokens long).
        """
        lengths = dict(lengths or {})
        seq_names = [s.name for s in self.specs if s.kind == "sequence"]
        unknown = [k for k in lengths if k not in seq_names]
        if unknown:
            raise ValueError(f"lengths given for {unknown}, which are not sequence modalities (sequences: {seq_names})")
        b = self.budgets(batch_size, seed, offset)
        seq_in = torch.zeros_like(b.input)
        seq_tg = torch.zeros_like(b.target)
        sources, n_ins, n_tgs = {}, {}, {}
        if seq_names:
            in_cpu, tg_cpu, comp_cpu = b.input.cpu(), b.target.cpu(), b.component.cpu().long()
            for m, spec in enumerate(self.specs):
                if spec.kind != "sequence":
                    continue
                if spec.name in lengths:
                    L = torch.as_tensor(lengths[spec.name])
                    if L.shape != (batch_size,) or L.dtype.is_floating_point:
                        raise ValueError(f"lengths[{spec.name!r}] must be an integer tensor of shape ({batch_size},), got {L.dtype} {tuple(L.shape)}")
                    if (L < 0).any():
                        raise ValueError(f"lengths[{spec.name!r}] must be >= 0")
                    # longer sequences are cut to num_tokens (4M's ids[:max_tokens]); clamped before
                    # the int32 cast, which made 2**32 + 3 a 3-token sequence
                    L = L.to("cpu").clamp(max=spec.num_tokens).to(torch.int32)
                else:
                    L = torch.full((batch_size,), spec.num_tokens, dtype=torch.int32)
                keep = self.keep_table[comp_cpu, m].contiguous()
                src, n_in, n_tg, _ = span_mask(L, in_cpu[:, m].contiguous(), tg_cpu[:, m].contiguous(), keep,
                                               spec.num_tokens, m, seed, offset)
                sources[spec.name], n_ins[spec.name], n_tgs[spec.name] = src, n_in, n_tg
                seq_in[:, m] = n_in.to(seq_in.device)
                seq_tg[:, m] = n_tg.to(seq_tg.device)
        slots = token_layout(b.input, b.target, seq_in, seq_tg, self.size, self.is_image,
                             self.input_range[1], self.target_range[1], seed, offset)
        return TokenLayout(self.modalities, self.specs, self.offsets, self.buffer_size, b, slots, sources, n_ins, n_tgs)


def to_ml4m_batch(layout: TokenLayout, tokens: Mapping[str, Tensor], sentinel_ids: Sequence[int] | Tensor | None = None,
                  pad_id: int = 0) -> dict[str, dict[str, Tensor]]:
    """The same draw in ml-4m's batch format: per modality ``tensor``, ``input_mask`` (True = not an
    input), ``target_mask`` (True = not a target), ``decoder_attention_mask`` (int32: an image's
    target count at its first target position; 1 at each sequence target position)."""
    buffer = layout.build_buffer(tokens, sentinel_ids, pad_id)
    s = layout.slots
    B = layout.batch_size
    rows_e = torch.arange(B, device=buffer.device)[:, None].expand_as(s.enc_index)
    rows_d = torch.arange(B, device=buffer.device)[:, None].expand_as(s.dec_index)
    is_input = torch.zeros(B, layout.buffer_size, dtype=torch.bool, device=buffer.device)
    is_target = torch.zeros_like(is_input)
    is_input[rows_e[s.enc_valid], s.enc_index[s.enc_valid]] = True
    is_target[rows_d[s.dec_valid], s.dec_index[s.dec_valid]] = True
    out = {}
    for spec, off in zip(layout.specs, layout.offsets):
        sl = slice(off, off + spec.buffer_size)
        tgt = is_target[:, sl]
        if spec.kind == "image":
            dam = torch.zeros(B, spec.num_tokens, dtype=torch.int32, device=buffer.device)
            count = tgt.sum(1).to(torch.int32)
            first = torch.where(tgt.any(1), tgt.int().argmax(1), torch.zeros_like(count).long())
            dam[torch.arange(B, device=buffer.device), first] = count
            tensor = tokens[spec.name].to(buffer.device)
        else:
            dam = tgt.to(torch.int32)
            tensor = buffer[:, sl].to(torch.int32)
        out[spec.name] = {"tensor": tensor, "input_mask": ~is_input[:, sl], "target_mask": ~tgt,
                          "decoder_attention_mask": dam}
    return out


# 4M-7 (ml-4m's mix_mod7_all2all_rgb2all_a0.5): component 0 is all -> all with alpha 0.5 everywhere,
# component 1 is rgb -> all (rgb the only input, every other modality a target). ml-4m feeds RGB
# both as pixels (rgb@224) and as tokens (tok_rgb); here one "rgb" token modality plays both roles.
FOURM7_ALPHAS_IN = {"rgb": [0.5, 1000.0], "depth": [0.5, 0.0], "normal": [0.5, 0.0], "semseg": [0.5, 0.0],
                    "clip": [0.5, 0.0], "caption": [0.5, 0.0], "det": [0.5, 0.0]}
FOURM7_ALPHAS_TG = {"rgb": [0.5, 0.0], "depth": [0.5, 0.5], "normal": [0.5, 0.5], "semseg": [0.5, 0.5],
                    "clip": [0.5, 0.5], "caption": [0.5, 0.5], "det": [0.5, 0.5]}


def fourm7_specs(image_tokens: int = 196, max_text_tokens: int = 256) -> list[ModalitySpec]:
    """Five image-like token modalities of ``image_tokens`` tokens each (196: a 14 x 14 grid at
    224 px) plus caption and boxes as text of up to ``max_text_tokens``. (The first argument was
    named ``grid``, which elsewhere means a grid's side: renamed so that 14 cannot be misread.)"""
    images = [ModalitySpec(n, "image", image_tokens) for n in ("rgb", "depth", "normal", "semseg", "clip")]
    return images + [ModalitySpec("caption", "sequence", max_text_tokens), ModalitySpec("det", "sequence", max_text_tokens)]


def fourm7_sampler(tokens: int = 128, device: str | torch.device = "cpu") -> TokenBudgetSampler:
    """4M-7's mixture at 128/128 or 256/256 input/target tokens (any count works)."""
    return TokenBudgetSampler(fourm7_specs(), tokens, tokens, FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG, device=device)
