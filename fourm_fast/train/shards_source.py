"""Training batches from tokenized shards (fourm-fast data synth -> tokenizer train -> tokenize).

Like the synthetic source, a step's global batch is a pure function of (seed, step): the samples
come from a seeded permutation per epoch, so resume and N processes see the very batches one
uninterrupted process would.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.loader import TokenShards
from ..data.shards import ShardError, read_manifest
from ..masking import ModalitySpec
from ..model import FourMBatch, FourMConfig, ModalityConfig, batch_from_layout
from .config import ConfigError
from .synthetic import make_sampler


def modalities_from_shards(path: str, max_text_tokens: int) -> list[ModalityConfig]:
    """From the manifest alone (ShardSource validates the arrays, honouring data.skip_bad)."""
    manifest = read_manifest(path)
    if not manifest.get("tokens"):
        raise ShardError(f"{path}: the manifest lists no tokens; run fourm-fast tokenize {path}")
    out = []
    for m, entry in manifest["tokens"].items():
        if len(entry["shape"]) == 3:
            out.append(ModalityConfig(m, "image", entry["num_codes"], grid=entry["shape"][1]))
        else:
            out.append(ModalityConfig(m, "sequence", entry["num_codes"], max_length=max_text_tokens))
    return out


class ShardSource:
    def __init__(self, model_cfg: FourMConfig, data_cfg: dict, seed: int, log=lambda line: None):
        self.model_cfg = model_cfg
        self.seed = seed
        self.names = [m.name for m in model_cfg.modalities]
        # skip_bad: token rows with ids outside the vocabulary (or bad lengths) are left out and counted
        # (self.ds.skipped, one log line), else the first one raises naming its file
        self.ds = TokenShards(data_cfg["path"], self.names, skip_bad=bool(data_cfg.get("skip_bad", False)))
        self.skipped = self.ds.skipped
        # the tokenizer files the tokens came from (checked unchanged by TokenShards): checkpoints
        # record them, so generate can tell whether DATA/tokenizers still decodes what the model learnt
        self.tokenizers = {m: {"file": e.get("tokenizer"), "sha256": e.get("tokenizer_sha256")}
                           for m, e in self.ds.manifest["tokens"].items() if m in self.names}
        for m in model_cfg.modalities:
            entry = self.ds.manifest["tokens"][m.name]
            if m.vocab_size < entry["num_codes"]:
                raise ConfigError(f"{m.name}: model vocab_size {m.vocab_size} < the tokenizer's {entry['num_codes']}")
            if m.kind == "image" and m.num_tokens != self.ds.arrays[m.name].shape[1]:
                raise ConfigError(f"{m.name}: the model expects {m.num_tokens} tokens, the shards hold "
                                 f"{self.ds.arrays[m.name].shape[1]}")
        from ..tokenizers.text import TextTokenizer
        from pathlib import Path

        seqs = [m for m in model_cfg.modalities if m.kind == "sequence"]
        text = Path(data_cfg["path"]) / "tokenizers" / "text.json"
        self.sentinels = []
        if seqs:
            if not text.exists():
                raise ShardError(f"{text} does not exist: the span masking of {seqs[0].name} needs its sentinel ids")
            self.sentinels = TextTokenizer.load(text).sentinel_ids
        for m in seqs:
            # a sequence of L tokens has at most ceil(L / 2) masked runs; the target ends with one
            # more sentinel, and numbering starts at [S_1]
            need = (m.max_length + 1) // 2 + 2
            if len(self.sentinels) < need:
                raise ConfigError(f"{m.name}: {m.max_length} tokens need {need} sentinels ([S_0] .. [S_{need - 1}]), "
                                  f"{text} has {len(self.sentinels)}")
            if max(self.sentinels[:need]) >= m.vocab_size:
                raise ConfigError(f"{m.name}: sentinel ids of {text} reach {max(self.sentinels[:need])}, "
                                  f"beyond the model's vocab_size {m.vocab_size}")
            longer = int((self.ds.lengths[m.name][self.ds.good] > m.max_length).sum())
            if longer:
                log(f"data: {longer} of {len(self.ds)} {m.name} rows are longer than {m.max_length} tokens and are "
                    f"cut to that length (EOS dropped), as 4M does; data.max_text_tokens sets it")
        specs = [ModalitySpec(m.name, m.kind, m.num_tokens) for m in model_cfg.modalities]
        self.sampler = make_sampler(specs, data_cfg, self.names)
        self.num_encoder = self.sampler.input_range[1]
        self.num_decoder = self.sampler.target_range[1]

    def _indices(self, B: int, step: int) -> np.ndarray:
        """Sample ids of the step's global batch: positions in per-epoch permutations of the usable
        samples (all of them unless skip_bad left some out)."""
        n = len(self.ds)
        start = step * B
        out = []
        while len(out) < B:
            epoch, pos = divmod(start + len(out), n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.extend(perm[pos:pos + B - len(out)].tolist())
        return self.ds.good[np.array(out)]

    def global_batch(self, B: int, step: int) -> tuple[FourMBatch, dict]:
        tokens, lengths = self.ds.batch(self._indices(B, step))
        seq_lengths = {m: lengths[m].clamp(max=self.model_cfg.modality(m).max_length) for m in lengths}
        layout = self.sampler.sample(B, seed=self.seed * 1_000_003 + step, lengths=seq_lengths)
        parts = []
        for spec in layout.specs:
            if spec.kind == "image":
                parts.append(tokens[spec.name])
            else:
                parts.append(layout.sequence_tokens(spec.name, tokens[spec.name], self.sentinels, 0))
        return batch_from_layout(layout, torch.cat(parts, 1), self.names), {"layout": layout}
