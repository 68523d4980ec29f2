"""FourM: 4M's encoder-decoder on fourm_fast's ops.

Structure and parameter names follow ml-4m's FourM (fourm/models/fm.py), so its state dicts load
unchanged: per-modality encoder/decoder embeddings (token, modality and fixed sin-cos position
embeddings, tied output heads), pre-norm encoder blocks, decoder blocks (self-attention,
cross-attention over a projection of the encoder output plus its embeddings, MLP), a mask token.

Differences in how, not what: the inputs arrive as gathered slots (FourMBatch) instead of being
selected by argsort inside the model; attention masks are O(N) metadata for masked_attention
instead of dense B x N x N tensors; the loss slices the valid decoder slots by modality with
host-known counts and computes logits chunk by chunk (no B x N x V tensor, no host sync).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .batch import FourMBatch
from .blocks import Block, DecoderBlock, _norm
from .config import FourMConfig
from .embeddings import DecoderEmbedding, EncoderEmbedding

LOSS_CHUNK = 8192  # decoder rows per logits chunk in the loss
RECOMPUTE_ELEMENTS = 1 << 24  # chunks with more logits than this are recomputed in backward, not stored


class _HeadLogits(torch.autograd.Function):
    """``y @ weight.T`` whose weight gradient is a fresh contiguous ``(V, dim)`` tensor.

    Autograd's own product returns that gradient as the transpose of a ``(dim, V)`` product, a
    view it cannot add into in place. A sequence modality's table is both the head and the
    decoder's token lookup, so its two gradients meet, and the sum was a third V x dim tensor
    each step (30000 x 384 float32: allocated, page-faulted and written, ~12 ms a CPU step of
    bench_train's case). Under autocast the product runs in the autocast dtype as before, and
    the backward products take that dtype too (the engine casts the gradients to the inputs').
    """

    @staticmethod
    def forward(y: Tensor, weight: Tensor) -> Tensor:
        return y @ weight.t()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: Tensor):
        y, weight = ctx.saved_tensors
        grad_y = g @ weight.to(g.dtype) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ y.to(g.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w


# cross_entropy skips targets equal to its ignore_index (-100 by default) while the loss still
# divides by the count: no target id may be skipped, so the index is one no int64 id equals
# except its minimum, and -100 now raises as any other id outside the vocabulary does.
_NO_IGNORED_TARGET = -(2**63)


def _chunk_ce_sum(y: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(_HeadLogits.apply(y, weight), targets, reduction="sum", ignore_index=_NO_IGNORED_TARGET)


class FourM(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = [m.name for m in cfg.modalities]
        self.encoder_embeddings = nn.ModuleDict({n: EncoderEmbedding(cfg.modality(n), cfg.dim) for n in cfg.domains_in})
        self.decoder_embeddings = nn.ModuleDict({n: DecoderEmbedding(cfg.modality(n), cfg.dim) for n in cfg.domains_out})
        for n in set(cfg.domains_in) & set(cfg.domains_out):  # 4M shares modality embeddings
            self.decoder_embeddings[n].mod_emb = self.encoder_embeddings[n].mod_emb
        self.encoder = nn.ModuleList([Block(cfg) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = _norm(cfg)
        self.decoder_proj_context = nn.Linear(cfg.dim, cfg.dim)
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = _norm(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.dim)) if cfg.num_register_tokens else None
        # Per modality id: where its positions start in the concatenated position tables (fixed
        # buffers, not saved) and where its vocabulary starts in the concatenated token tables.
        self._build_tables()
        self.init_weights()

    # ---- construction ------------------------------------------------------------------------
    def _build_tables(self):
        M = len(self.modalities)
        # per modality id: is it a sequence (built once, not a host-to-device copy every step)
        self.register_buffer("_is_sequence", torch.tensor([m.kind == "sequence" for m in self.cfg.modalities]),
                             persistent=False)
        for side, embs in (("enc", self.encoder_embeddings), ("dec", self.decoder_embeddings)):
            pos_off, vocab_off, tables = [0] * M, [0] * M, []
            pos_count, vocab_size = [0] * M, [0] * M  # 0: this side does not embed the modality
            p = v = 0
            for i, name in enumerate(self.modalities):
                if name in embs:
                    pos_off[i], vocab_off[i] = p, v
                    pos_count[i], vocab_size[i] = embs[name].pos_emb.shape[1], embs[name].token_emb.num_embeddings
                    tables.append(embs[name].pos_emb[0])
                    p += embs[name].pos_emb.shape[1]
                    v += embs[name].token_emb.num_embeddings
            table = torch.cat(tables) if tables else torch.zeros(0, self.cfg.dim)
            self.register_buffer(f"_{side}_pos_table", table, persistent=False)
            self.register_buffer(f"_{side}_pos_offset", torch.tensor(pos_off), persistent=False)
            self.register_buffer(f"_{side}_vocab_offset", torch.tensor(vocab_off), persistent=False)
            self.register_buffer(f"_{side}_pos_count", torch.tensor(pos_count), persistent=False)
            self.register_buffer(f"_{side}_vocab_size", torch.tensor(vocab_size), persistent=False)

    def init_weights(self, std: float = 0.02):
        """4M's (MAE-style) init: xavier-uniform linears (q, k, v treated separately), N(0, 0.02)
        embeddings and modality/mask tokens, unit LayerNorms."""
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                if name.endswith("qkv") or name.endswith(".kv"):
                    parts = 3 if name.endswith("qkv") else 2
                    bound = math.sqrt(6.0 / (mod.weight.shape[0] // parts + mod.weight.shape[1]))
                    nn.init.uniform_(mod.weight, -bound, bound)
                elif not name.endswith("to_logits"):  # tied to token_emb, initialised there
                    nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
        for emb in (*self.encoder_embeddings.values(), *self.decoder_embeddings.values()):
            nn.init.normal_(emb.mod_emb, std=std)
        nn.init.normal_(self.mask_token, std=std)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=std)

    # ---- embeddings --------------------------------------------------------------------------
    def _mod_emb(self, embs: nn.ModuleDict, mod: Tensor) -> Tensor:
        """Each slot's learned modality embedding. A lookup through F.embedding rather than
        ``table[mod]``: the latter's backward (index_put_ with accumulate) adds with atomics across
        threads on the CPU, so gradients, and a resumed run, would vary run to run."""
        rows = [embs[n].mod_emb[0, 0] if n in embs else self.mask_token.new_zeros(self.cfg.dim) for n in self.modalities]
        return F.embedding(mod, torch.stack(rows))

    def _lookup(self, embs: nn.ModuleDict, ids: Tensor, mod: Tensor, sequences_only: bool = False) -> Tensor | None:
        """Token embeddings of mixed-modality ids: one small lookup per modality, merged by where
        (cheaper than concatenating the vocabulary tables every step; no data-dependent shapes).
        sequences_only: skip image modalities (None when no modality is left)."""
        out = None
        for i, name in enumerate(self.modalities):
            if name not in embs or (sequences_only and self.cfg.modalities[i].kind != "sequence"):
                continue
            table = embs[name].token_emb.weight
            x = F.embedding(ids.clamp(0, table.shape[0] - 1), table)
            out = x if out is None else torch.where((mod == i)[..., None], x, out)
        return out

    def _checked_slots(self, side: str, ids: Tensor, pos: Tensor, mod: Tensor, valid: Tensor,
                       sequence_ids_only: bool) -> tuple[Tensor, Tensor]:
        """(modality, position) safe to index with, after checking the slots.

        Valid slots must name a modality of the model that this side embeds, a position it has
        and (where the id is embedded) an id in its vocabulary. The lookups clamp ids and index
        one concatenated position table, so a bad slot read a neighbour's row silently. The check
        stays on the device (no host sync): an assert raises on the CPU, a device-side assert on
        CUDA. Invalid (padding) slots are unused, whatever they hold: their modality and position
        are clamped into range so that no lookup indexes outside a table."""
        mod_ok = (mod >= 0) & (mod < len(self.modalities))
        mod = mod.clamp(0, len(self.modalities) - 1)
        npos, nvocab = getattr(self, f"_{side}_pos_count")[mod], getattr(self, f"_{side}_vocab_size")[mod]
        ids_used = self._is_sequence[mod] if sequence_ids_only else True
        bad = valid & (~mod_ok | (pos < 0) | (pos >= npos) | (ids_used & ((ids < 0) | (ids >= nvocab))))
        torch._assert_async(~bad.any(), f"FourM: a valid {side}_* slot has a modality the "
                            f"{'encoder' if side == 'enc' else 'decoder'} does not embed, a position beyond its "
                            "modality's or a token id outside its vocabulary")
        return mod, torch.minimum(pos.clamp(min=0), (npos - 1).clamp(min=0))

    def embed_encoder(self, b: FourMBatch) -> tuple[Tensor, Tensor]:
        mod, pos = self._checked_slots("enc", b.enc_ids, b.enc_position.long(), b.enc_modality.long(), b.enc_valid, False)
        x = self._lookup(self.encoder_embeddings, b.enc_ids.long(), mod)
        emb = self._enc_pos_table[self._enc_pos_offset[mod] + pos] + self._mod_emb(self.encoder_embeddings, mod)
        keep = b.enc_valid[..., None]
        return torch.where(keep, x, 0.0), torch.where(keep, emb, 0.0)

    def embed_decoder(self, b: FourMBatch, check: bool = True) -> tuple[Tensor, Tensor]:
        """check=False: the caller vouches for the slots (the KV cache's step, whose ids are the
        start sentinel or tokens sampled from the head's own vocabulary, at a position it bounds)."""
        mod, pos = b.dec_modality.long(), b.dec_position.long()
        if check:  # image slots: ids unread
            mod, pos = self._checked_slots("dec", b.dec_ids, pos, mod, b.dec_valid, True)
        is_seq = self._is_sequence[mod]
        # Image slots take the mask token, so only sequence tables are looked up: a lookup of an
        # image table was discarded by the where, yet its backward still zero-filled a V x dim
        # gradient and added it to the tied head's.
        tok = self._lookup(self.decoder_embeddings, b.dec_ids.long(), mod, sequences_only=True)
        mask = self.mask_token.expand(*mod.shape, -1)
        y = mask if tok is None else torch.where(is_seq[..., None], tok, mask.to(tok.dtype))
        emb = self._dec_pos_table[self._dec_pos_offset[mod] + pos] + self._mod_emb(self.decoder_embeddings, mod)
        keep = b.dec_valid[..., None]
        return torch.where(keep, y, 0.0), torch.where(keep, emb, 0.0)

    # ---- trunk -------------------------------------------------------------------------------
    def encode(self, b) -> tuple[Tensor, Tensor]:
        """Encoder pass over ``b``'s enc_* slots (a FourMBatch, or anything with enc_ids,
        enc_modality, enc_position, enc_valid): (context [B, Ne', dim], context_valid [B, Ne']),
        the decoder's cross-attention keys before its per-layer projections (register tokens
        first when the model has them)."""
        x, enc_emb = self.embed_encoder(b)
        enc_valid = b.enc_valid
        if self.register_tokens is not None:
            B = x.shape[0]
            reg = self.register_tokens.expand(B, -1, -1)
            x = torch.cat([reg, x], 1)
            enc_emb = torch.cat([torch.zeros_like(reg), enc_emb], 1)
            enc_valid = torch.cat([enc_valid.new_ones(B, reg.shape[1]), enc_valid], 1)
        x = x + enc_emb
        for blk in self.encoder:
            x = blk(x, enc_valid)
        x = self.encoder_norm(x)
        return self.decoder_proj_context(x) + enc_emb, enc_valid

    def decode(self, b, context: Tensor, context_valid: Tensor) -> Tensor:
        """Decoder pass over ``b``'s dec_* slots given the encoder's context: [B, Nd, dim] after
        decoder_norm."""
        y, dec_emb = self.embed_decoder(b)
        y = y + dec_emb
        for blk in self.decoder:
            y = blk(y, context, b.dec_valid, b.dec_segment, b.dec_limit, b.dec_rank, context_valid)
        return self.decoder_norm(y)

    def check_batch(self, b: FourMBatch, counts: list[int] | None = None) -> None:
        """Host-side checks of a batch's structure (no device sync): slot tensors of one shape per
        side, decoder counts that add up to dec_order, and the decoder masking rule of the model.
        Values (ids, positions) are checked on the device by the embeddings."""
        enc = {k: getattr(b, k) for k in ("enc_ids", "enc_modality", "enc_position", "enc_valid")}
        dec = {k: getattr(b, k) for k in ("dec_ids", "dec_targets", "dec_modality", "dec_position", "dec_valid",
                                          "dec_segment", "dec_rank", "dec_limit") if getattr(b, k) is not None}
        for side, fields in (("enc", enc), ("dec", dec)):
            shapes = {k: tuple(v.shape) for k, v in fields.items()}
            first = next(iter(shapes.values()))
            if len(first) != 2 or any(s != first for s in shapes.values()):
                raise ValueError(f"FourM: the {side}_* slot tensors must share one (B, N) shape, got {shapes}")
        if b.enc_ids.shape[0] != b.dec_ids.shape[0]:
            raise ValueError(f"FourM: encoder and decoder slots have batch sizes {b.enc_ids.shape[0]} and {b.dec_ids.shape[0]}")
        M = len(self.modalities)
        for name, c in (("dec_counts", b.dec_counts), ("counts", counts)):
            if c is None:
                continue
            if len(c) != M or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in c):
                raise ValueError(f"FourM: {name} must hold {M} ints >= 0 (one per modality of the model), got {c!r}")
        # counts= are the whole batch's when b is a slice of it: never fewer than the slice's own
        # (a 0 there divided the slice's sum by 1 and inflated the loss)
        if counts is not None and any(c < d for c, d in zip(counts, b.dec_counts)):
            raise ValueError(f"FourM: counts {list(counts)} (the whole batch's) are below this batch's own "
                             f"dec_counts {b.dec_counts}")
        if sum(b.dec_counts) != b.dec_order.numel():
            raise ValueError(f"FourM: dec_counts {b.dec_counts} add up to {sum(b.dec_counts)}, but dec_order lists "
                             f"{b.dec_order.numel()} slots")
        want = (self.cfg.decoder_sep_mask, self.cfg.decoder_causal_mask)
        if b.decoder_mask is not None and tuple(b.decoder_mask) != want:
            raise ValueError(f"FourM: the batch's decoder metadata follows (decoder_sep_mask, decoder_causal_mask) = "
                             f"{tuple(b.decoder_mask)}, but this model has {want}; batch_from_layout builds 4M's default "
                             "rule (True, False) only: use forward_ml4m, whose batches follow the model's flags")

    def forward_hidden(self, b: FourMBatch) -> Tensor:
        """Decoder output after decoder_norm, [B, Nd, dim]."""
        context, context_valid = self.encode(b)
        return self.decode(b, context, context_valid)

    def modality_losses(self, b: FourMBatch, y: Tensor) -> dict[str, tuple[Tensor, int]]:
        """Per decoder modality: (sum of cross-entropy over its valid targets, count)."""
        flat = y.reshape(-1, y.shape[-1])
        targets = b.dec_targets.reshape(-1).long()
        out = {}
        start = 0
        for i, name in enumerate(self.modalities):
            n = b.dec_counts[i]
            rows = b.dec_order[start:start + n]
            start += n
            if name not in self.decoder_embeddings:
                if n:
                    raise ValueError(f"decoder targets of modality {name!r}, which the model does not decode")
                continue
            weight = self.decoder_embeddings[name].to_logits.weight
            total = flat.new_zeros(())
            if n == 0 and torch.is_grad_enabled() and weight.requires_grad:
                # No targets of this modality here: its head (an image modality's only use of the
                # tied table) still gets a zero gradient, so DDP sees every parameter used and
                # AdamW updates it as on any other step.
                total = weight.sum() * 0.0
            for c in range(0, n, LOSS_CHUNK):
                idx = rows[c:c + LOSS_CHUNK]
                yc, tc = flat.index_select(0, idx), targets.index_select(0, idx)
                if torch.is_grad_enabled() and idx.numel() * weight.shape[0] > RECOMPUTE_ELEMENTS:
                    total = total + checkpoint(_chunk_ce_sum, yc, weight, tc, use_reentrant=False)
                else:
                    total = total + _chunk_ce_sum(yc, weight, tc)
            out[name] = (total, n)
        return out

    def forward(self, b: FourMBatch, loss_type: str = "mod", counts: list[int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, per-modality mean losses). "mod": mean over decoder modalities of each one's mean
        cross-entropy (a modality without targets counts as 0, as in 4M); "token": mean over all
        target tokens.

        counts: per-modality target counts of the batch the means are over, when ``b`` is a slice
        of it (a process's share, an accumulation step): the slices' losses then add up exactly to
        the whole batch's loss. Default: ``b.dec_counts``.
        """
        if loss_type not in ("mod", "token"):
            raise ValueError(f"loss_type must be 'mod' or 'token', got {loss_type!r}")
        self.check_batch(b, counts)
        counts = b.dec_counts if counts is None else counts
        y = self.forward_hidden(b)
        parts = self.modality_losses(b, y)
        index = {n: i for i, n in enumerate(self.modalities)}
        per_mod = {n: s / max(counts[index[n]], 1) for n, (s, _) in parts.items()}
        if loss_type == "mod":
            loss = sum(per_mod.values()) / max(len(per_mod), 1)
        else:
            loss = sum(s for s, _ in parts.values()) / max(sum(counts[index[n]] for n in parts), 1)
        if not any(b.dec_counts):
            # no targets in this batch (a process's or an accumulation step's share can have none):
            # a loss of 0 still tied to the graph, so backward runs (zero gradients) and every
            # process joins the gradient all-reduce; a detached zero raised in backward
            loss = loss + y.sum() * 0.0
        return loss, per_mod

    def logits(self, b: FourMBatch, y: Tensor | None = None) -> dict[str, Tensor]:
        """[B, Nd, V] logits of every decoder slot under each output head (4M's return_logits)."""
        if y is None:
            self.check_batch(b)
            y = self.forward_hidden(b)
        return {n: e.to_logits(y) for n, e in self.decoder_embeddings.items()}

    # ---- ml-4m compatibility -----------------------------------------------------------------
    @classmethod
    def from_ml4m(cls, path_or_state_dict, config: dict) -> "FourM":
        from .ml4m import load_ml4m
        return load_ml4m(cls, path_or_state_dict, config)

    def forward_ml4m(self, mod_dict: dict, num_encoder_tokens: int, num_decoder_tokens: int, loss_type: str = "mod",
                     return_logits: bool = False):
        """A batch in ml-4m's format, as ml-4m's FourM.forward takes it: returns (loss,
        per-modality losses), or with return_logits the per-modality [B, Nd, V] logits."""
        from .ml4m import batch_from_ml4m, ml4m_losses
        b = batch_from_ml4m(self, mod_dict, num_encoder_tokens, num_decoder_tokens)
        y = self.forward_hidden(b)
        if return_logits:
            return self.logits(b, y)
        return ml4m_losses(self, b, y, [n for n in mod_dict if n in self.decoder_embeddings], loss_type)
