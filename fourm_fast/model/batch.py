"""FourMBatch: what the model consumes, built with gathers from the sampler's layout (native path) or
from a batch in ml-4m's format (compatibility path)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FourMBatch:
    """Encoder and decoder slots, [B, N] each; modality ids index ``FourMConfig.modalities``.

    enc_position / dec_position index the modality's position table. For a sequence the decoder
    slot holds the target token's own id as input (4M's shifted teacher forcing) and the next
    token as target. dec_segment / dec_rank / dec_limit are masked_attention metadata (segments
    None when the decoder attends across modalities). ``dec_order`` lists the valid decoder
    slots (flattened b * N + j) grouped by modality, with ``dec_counts[m]`` slots for modality m:
    host-side ints so the loss slices without a device sync. ``decoder_mask``: the decoder
    masking rule the metadata encodes, ``(sep, causal)`` as FourMConfig's decoder_sep_mask and
    decoder_causal_mask (None: not stated); FourM refuses a batch whose rule is not its own.
    """

    enc_ids: Tensor
    enc_modality: Tensor
    enc_position: Tensor
    enc_valid: Tensor
    dec_ids: Tensor
    dec_targets: Tensor
    dec_modality: Tensor
    dec_position: Tensor
    dec_valid: Tensor
    dec_segment: Tensor | None
    dec_rank: Tensor | None
    dec_limit: Tensor | None
    dec_order: Tensor
    dec_counts: list[int]
    decoder_mask: tuple[bool, bool] | None = None

    def to(self, device, non_blocking: bool = False) -> "FourMBatch":
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
        return FourMBatch(**out)

    @property
    def num_targets(self) -> int:
        return sum(self.dec_counts)


def decoder_order(dec_modality: Tensor, dec_valid: Tensor, num_modalities: int) -> tuple[Tensor, list[int]]:
    """Valid decoder slots grouped by modality (batch-major, slot order inside), and the counts.

    Call it where the layout lives on the CPU (the data side): the counts are then free. On a GPU
    it costs one synchronisation.
    """
    flat_mod = dec_modality.reshape(-1).long()
    flat_valid = dec_valid.reshape(-1)
    key = torch.where(flat_valid, flat_mod, torch.full_like(flat_mod, num_modalities))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_modalities + 1)[:num_modalities].tolist()
    return order[: sum(counts)], counts


def batch_from_layout(layout, buffer: Tensor, model_modalities: list[str]) -> FourMBatch:
    """The native path: one gather per side from the per-sample token buffer.

    layout: fourm_fast.masking.TokenLayout; buffer: layout.build_buffer(...) [B, buffer_size];
    model_modalities: the model's modality names (the sampler's must be among them).
    """
    index = {n: i for i, n in enumerate(model_modalities)}
    missing = [n for n in layout.modalities if n not in index]
    if missing:
        raise ValueError(f"the sampler's modalities {missing} are not in the model ({model_modalities})")
    s = layout.slots
    remap = torch.tensor([index[n] for n in layout.modalities], dtype=torch.long, device=buffer.device)
    is_seq = torch.tensor([sp.kind == "sequence" for sp in layout.specs], device=buffer.device)
    enc_mod = remap[s.enc_modality.long()]
    enc_ids = buffer.gather(1, s.enc_index)
    dec_ids = buffer.gather(1, s.dec_index)
    seq_slot = is_seq[s.dec_modality.long()]
    # A sequence slot predicts the next slot's token; the last target slot has no next token (4M's
    # shift drops it), so it is not a decoder position.
    nxt = (s.dec_index + 1).clamp(max=buffer.shape[1] - 1)
    dec_targets = torch.where(seq_slot, buffer.gather(1, nxt), dec_ids)
    next_is_target = torch.zeros_like(s.dec_valid)
    next_is_target[:, :-1] = s.dec_valid[:, 1:] & (s.dec_modality[:, 1:] == s.dec_modality[:, :-1]) & \
        (s.dec_index[:, 1:] == s.dec_index[:, :-1] + 1)
    dec_valid = s.dec_valid & (~seq_slot | next_is_target)
    # positions: images their grid index; a sequence its rank among inputs / targets
    enc_pos = s.enc_position.long()
    dec_pos = torch.where(seq_slot, s.dec_rank.long(), s.dec_position.long())
    limit = torch.where(dec_valid, s.dec_limit, torch.full_like(s.dec_limit, -1))
    dec_mod = remap[s.dec_modality.long()]
    order, counts = decoder_order(dec_mod, dec_valid, len(model_modalities))
    # the sampler's metadata is 4M's default rule: attention within a modality, causal inside a
    # sequence (FourMConfig's decoder_sep_mask=True, decoder_causal_mask=False)
    return FourMBatch(enc_ids, enc_mod, enc_pos, s.enc_valid, dec_ids, dec_targets, dec_mod, dec_pos, dec_valid,
                      s.dec_segment, s.dec_rank, limit, order, counts, decoder_mask=(True, False))
