"""The built-in synthetic batch source: token grids and sequences with cross-modal structure (so a
model can learn something), masked by the token-budget sampler: what `fourm-fast train` feeds the
model with data.source "synthetic" (the shipped config); "shards" reads tokenized data instead.

A step's global batch is a pure function of (seed, step): every process builds the same global
layout and keeps its own slice, so N processes see exactly the samples one process would, and a
resumed run continues with the very batches it would have seen.
"""
from __future__ import annotations

import torch

from ..masking import ModalitySpec, TokenBudgetSampler
from ..model import FourMBatch, FourMConfig, batch_from_layout
from .config import ConfigError


def _alpha_table(value, names, where: str):
    """data.alphas_*: one number for every modality, or {name: number or [per-component values]}
    naming every modality and no other (a misspelt name used to be dropped here unseen)."""
    if isinstance(value, str):  # YAML 1.1 reads 5e-1 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {n: [float(value)] for n in names}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a number or a mapping {{modality: alpha or [alphas]}}, got {value!r}")
    unknown, missing = sorted(set(value) - set(names)), [n for n in names if n not in value]
    if unknown or missing:
        raise ConfigError(f"{where}: unknown modalities {unknown}, missing {missing} (the model's: {names})")
    try:
        return {n: [float(a) for a in value[n]] if isinstance(value[n], (list, tuple)) else [float(value[n])] for n in names}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: alphas must be numbers, got {value!r}") from None


def make_sampler(specs, data_cfg: dict, names: list[str]) -> TokenBudgetSampler:
    """The token-budget sampler of data_cfg; its refusals (ranges, alphas, weights) as ConfigErrors."""
    try:
        sampler = TokenBudgetSampler(specs, data_cfg["num_input_tokens"], data_cfg["num_target_tokens"],
                                     _alpha_table(data_cfg["alphas_in"], names, "data.alphas_in"),
                                     _alpha_table(data_cfg["alphas_tg"], names, "data.alphas_tg"),
                                     weights=data_cfg.get("weights"))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {e}") from None
    for what, (_, hi) in (("num_input_tokens", sampler.input_range), ("num_target_tokens", sampler.target_range)):
        if hi < 1:
            raise ConfigError(f"data.{what}: at least one token is needed, got at most {hi}")
    return sampler


class SyntheticSource:
    def __init__(self, model_cfg: FourMConfig, data_cfg: dict, seed: int):
        self.model_cfg = model_cfg
        self.seed = seed
        self.mods = list(model_cfg.modalities)
        self.names = [m.name for m in self.mods]
        specs = [ModalitySpec(m.name, m.kind, m.num_tokens) for m in self.mods]
        self.num_sentinels = int(data_cfg["num_sentinels"])
        for m in self.mods:
            if m.kind == "sequence" and m.vocab_size <= self.num_sentinels + 2:
                raise ConfigError(f"{m.name}: vocab_size {m.vocab_size} leaves no room for {self.num_sentinels} sentinels")
            if m.kind == "sequence" and self.num_sentinels < m.max_length // 2 + 3:
                raise ConfigError(f"data.num_sentinels {self.num_sentinels} is too few for {m.name} (max_length {m.max_length})")
        self.sampler = make_sampler(specs, data_cfg, self.names)
        self.num_encoder = self.sampler.input_range[1]
        self.num_decoder = self.sampler.target_range[1]

    def _tokens(self, B: int, step: int) -> tuple[dict, dict]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + 17) % (2**63))
        base = torch.randint(0, 1 << 20, (B, 196), generator=g)
        tokens, lengths = {}, {}
        for i, m in enumerate(self.mods):
            if m.kind == "image":
                n = m.num_tokens
                grid = base[:, :n] if n <= base.shape[1] else torch.randint(0, 1 << 20, (B, n), generator=g)
                # modality i sees a fixed function of the same scene, plus a little noise
                noise = (torch.rand(B, n, generator=g) < 0.1).long() * torch.randint(0, m.vocab_size, (B, n), generator=g)
                tokens[m.name] = ((grid * (2 * i + 1) + i) % m.vocab_size + noise) % m.vocab_size
            else:
                usable = m.vocab_size - self.num_sentinels - 1  # ids 1 .. usable (0 is padding)
                L = torch.randint(2, m.max_length + 1, (B,), generator=g)
                # the text is a function of the scene's first token: learnable from the images
                tokens[m.name] = (base[:, :1] + torch.arange(m.max_length) * (i + 3)) % usable + 1
                lengths[m.name] = L
        return tokens, lengths

    @property
    def sentinel_ids(self) -> dict[str, list[int]]:
        return {m.name: list(range(m.vocab_size - self.num_sentinels, m.vocab_size)) for m in self.mods if m.kind == "sequence"}

    def global_batch(self, B: int, step: int) -> tuple[FourMBatch, dict]:
        """The whole step's batch (all processes, all accumulation steps), built on the CPU."""
        tokens, lengths = self._tokens(B, step)
        layout = self.sampler.sample(B, seed=self.seed * 1_000_003 + step, lengths=lengths)
        parts = []
        for spec in layout.specs:
            if spec.kind == "image":
                parts.append(tokens[spec.name])
            else:
                parts.append(layout.sequence_tokens(spec.name, tokens[spec.name], [0] + self.sentinel_ids[spec.name], 0))
        buffer = torch.cat(parts, 1)
        return batch_from_layout(layout, buffer, self.names), {"layout": layout}


def slice_batch(b: FourMBatch, start: int, stop: int, num_modalities: int) -> FourMBatch:
    """Samples [start, stop) of a batch, with its own decoder order and counts."""
    from ..model.batch import decoder_order

    fields = {k: (v[start:stop] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in b.__dict__.items()}
    order, counts = decoder_order(fields["dec_modality"], fields["dec_valid"], num_modalities)
    fields["dec_order"], fields["dec_counts"] = order, counts
    return FourMBatch(**fields)
