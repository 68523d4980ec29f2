"""ml-4m compatibility: load its checkpoints, read its batch format, compute its losses."""
from __future__ import annotations

import argparse
import math
import pickle
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .batch import FourMBatch, decoder_order
from .config import FourMConfig, ModalityConfig

# ml-4m checkpoint-config keys this loader understands (others are refused, so nothing is ignored
# silently).
ML4M_KEYS = {
    "domains_in", "domains_out", "image_size", "patch_size", "dim", "encoder_depth", "decoder_depth", "num_heads",
    "mlp_ratio", "qkv_bias", "proj_bias", "mlp_bias", "norm_bias", "act_layer", "gated_mlp", "qk_norm",
    "decoder_causal_mask", "decoder_sep_mask", "num_register_tokens", "share_modality_embeddings",
    "modality_kinds",  # fourm_fast extension: {name: "image" | "sequence"} where the name does not tell
    "max_lengths",     # fourm_fast extension: {name: tokens} for sequence modalities (default ML4M_MAX_LENGTH)
}
# ml-4m's sequence modalities (caption, det) take up to 256 tokens. Their pos_emb cannot tell: it
# always holds max_sincos_pos_emb (512) rows, because ml-4m's [:max_length] slice cuts the
# leading dimension of a (1, N, dim) table.
ML4M_MAX_LENGTH = 256
_ACTS = {"SiLU": "silu", "GELU": "gelu", "silu": "silu", "gelu": "gelu"}


def _read_state_dict(path_or_state_dict) -> dict[str, Tensor]:
    if isinstance(path_or_state_dict, dict):
        sd = dict(path_or_state_dict)
    else:
        path = Path(path_or_state_dict)
        if not path.exists():
            raise FileNotFoundError(f"ml-4m checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                sd = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"ml-4m checkpoint {path} cannot be read as a safetensors file: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        else:
            # ml-4m's training checkpoints ({"model", "epoch", "args", ...}) hold its argparse
            # Namespace: allowed, and still no arbitrary code
            try:
                with torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(str(path), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
                raise ValueError(f"ml-4m checkpoint {path} cannot be read as a weights-only torch file: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            sd = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict (or a dict with 'model'), got {type(sd).__name__}")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _kind(name: str, kinds: dict) -> str:
    if name in kinds:
        return kinds[name]
    # ml-4m names image-like token modalities tok_<name>@<size>; the rest it tokenizes as text
    return "image" if name.startswith("tok_") else "sequence"


def _fill_tied(sd: dict[str, Tensor], config: dict) -> None:
    """Tied tensors may be stored once, under either name: a decoder head and its token embedding,
    and (share_modality_embeddings) a modality's encoder and decoder mod_emb. torch.save keeps
    both; safetensors' save_model keeps one, the first name in sorted order (to_logits before
    token_emb, decoder_ before encoder_). Fill whichever is missing from the other."""
    pairs = [(f"decoder_embeddings.{n}.to_logits.weight", f"decoder_embeddings.{n}.token_emb.weight")
             for n in config.get("domains_out", ())]
    if _flag(config, "share_modality_embeddings", True):
        pairs += [(f"decoder_embeddings.{n}.mod_emb", f"encoder_embeddings.{n}.mod_emb")
                  for n in set(config.get("domains_in", ())) & set(config.get("domains_out", ()))]
    for a, b in pairs:
        if a in sd and b not in sd:
            sd[b] = sd[a]
        elif b in sd and a not in sd:
            sd[a] = sd[b]


def _flag(config: dict, key: str, default: bool) -> bool:
    """A boolean setting (true/false, or 0/1 as ml-4m's truthiness takes them); bool() of the
    string "false" was True."""
    v = config.get(key, default)
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, Integral) and v in (0, 1)):
        return bool(v)
    raise ValueError(f"from_ml4m: {key} must be true or false, got {v!r}")


def config_from_ml4m(config: dict, sd: dict[str, Tensor]) -> FourMConfig:
    unknown = sorted(set(config) - ML4M_KEYS)
    if unknown:
        raise ValueError(f"from_ml4m: unknown config keys {unknown} (known: {sorted(ML4M_KEYS)})")
    missing = [k for k in ("domains_in", "domains_out", "dim", "encoder_depth", "decoder_depth", "num_heads") if k not in config]
    if missing:
        raise ValueError(f"from_ml4m: config lacks {missing}")
    for key in ("domains_in", "domains_out"):  # a bare string was read letter by letter
        if not isinstance(config[key], (list, tuple)):
            raise ValueError(f"from_ml4m: {key} must be a list of modality names, got {config[key]!r}")
    dim = int(config["dim"])
    kinds = dict(config.get("modality_kinds", {}))
    lengths = dict(config.get("max_lengths", {}))
    names = sorted(set(config["domains_in"]) | set(config["domains_out"]))  # ml-4m's all_domains order
    for key, table in (("modality_kinds", kinds), ("max_lengths", lengths)):
        stray = sorted(set(table) - set(names))  # a misspelt name was ignored: rgb then loaded as a sequence
        if stray:
            raise ValueError(f"from_ml4m: {key} names {stray}, which are not among the domains {names}")
    bad_kinds = {n: k for n, k in kinds.items() if k not in ("image", "sequence")}
    if bad_kinds:
        raise ValueError(f"from_ml4m: modality_kinds must be 'image' or 'sequence', got {bad_kinds}")
    mods = []
    for n in names:
        side = "encoder" if n in config["domains_in"] else "decoder"
        key = f"{side}_embeddings.{n}.token_emb.weight"
        pos_key = f"{side}_embeddings.{n}.pos_emb"
        if key not in sd or pos_key not in sd:
            raise KeyError(f"from_ml4m: the checkpoint has no {key} / {pos_key} for modality {n!r}")
        vocab = sd[key].shape[0]
        positions = sd[pos_key].shape[1]
        kind = _kind(n, kinds)
        if kind == "image":
            grid = math.isqrt(positions)
            if grid * grid != positions:
                raise ValueError(f"from_ml4m: {n} is an image modality but its pos_emb has {positions} rows (not a square)")
            mods.append(ModalityConfig(n, "image", vocab, grid=grid))
        else:
            length = int(lengths.get(n, min(ML4M_MAX_LENGTH, positions)))
            if not 1 <= length <= positions:
                raise ValueError(f"from_ml4m: max_lengths[{n!r}] = {length} must be in 1..{positions} "
                                 f"(the rows of its pos_emb)")
            mods.append(ModalityConfig(n, "sequence", vocab, max_length=length, max_sincos_pos_emb=positions))
    if "image_size" in config and "patch_size" in config:  # the grid is read from pos_emb; they must agree
        side = int(config["image_size"]) // int(config["patch_size"])
        for m in mods:
            if m.kind == "image" and m.grid != side:
                raise ValueError(f"from_ml4m: image_size {config['image_size']} / patch_size {config['patch_size']} "
                                 f"gives a {side}x{side} token grid, but {m.name}'s pos_emb holds {m.grid}x{m.grid}")
    act = config.get("act_layer", "SiLU")
    if act not in _ACTS:
        raise ValueError(f"from_ml4m: act_layer {act!r} is not supported (SiLU or GELU)")
    return FourMConfig(
        dim=dim, encoder_depth=int(config["encoder_depth"]), decoder_depth=int(config["decoder_depth"]),
        num_heads=int(config["num_heads"]), mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        qkv_bias=_flag(config, "qkv_bias", False), proj_bias=_flag(config, "proj_bias", False),
        mlp_bias=_flag(config, "mlp_bias", False), norm_bias=_flag(config, "norm_bias", False),
        gated_mlp=_flag(config, "gated_mlp", True), act=_ACTS[act], qk_norm=_flag(config, "qk_norm", False),
        decoder_causal_mask=_flag(config, "decoder_causal_mask", False),
        decoder_sep_mask=_flag(config, "decoder_sep_mask", True),
        num_register_tokens=int(config.get("num_register_tokens", 0)), modalities=tuple(mods),
        domains_in=tuple(config["domains_in"]), domains_out=tuple(config["domains_out"]))


def load_ml4m(cls, path_or_state_dict, config: dict):
    sd = _read_state_dict(path_or_state_dict)
    share = _flag(config, "share_modality_embeddings", True)
    for n in set(config.get("domains_in", ())) & set(config.get("domains_out", ())) if share else ():
        enc, dec = sd.get(f"encoder_embeddings.{n}.mod_emb"), sd.get(f"decoder_embeddings.{n}.mod_emb")
        if enc is not None and dec is not None and not torch.equal(enc, dec):
            raise ValueError(f"from_ml4m: share_modality_embeddings is true but the checkpoint's encoder and decoder "
                             f"mod_emb of {n!r} differ (a checkpoint trained without sharing: pass false)")
    _fill_tied(sd, config)
    cfg = config_from_ml4m(config, sd)
    for m in cfg.modalities:  # a sequence's pos_emb: its first max_length rows (the rest ml-4m never reads)
        for side in ("encoder", "decoder"):
            key = f"{side}_embeddings.{m.name}.pos_emb"
            if m.kind == "sequence" and key in sd:
                sd[key] = sd[key][:, :m.max_length]
    model = cls(cfg)
    shared = set(cfg.domains_in) & set(cfg.domains_out)
    if not share:
        for n in shared:
            model.decoder_embeddings[n].mod_emb = nn.Parameter(model.decoder_embeddings[n].mod_emb.detach().clone())
    # A head stored apart from its token embedding, with other values, is an untied checkpoint.
    for n in cfg.domains_out:
        head, tok = f"decoder_embeddings.{n}.to_logits.weight", f"decoder_embeddings.{n}.token_emb.weight"
        if head in sd and tok in sd and not torch.equal(sd[head], sd[tok]):
            model.decoder_embeddings[n].to_logits.weight = nn.Parameter(sd[head].clone())  # untied checkpoint
    # (names stored once were filled from their tied partner by _fill_tied)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or bad_shapes:
        detail = "; ".join(f"{what}: {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape mismatch", [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shapes]))
                           if keys)
        raise ValueError(f"from_ml4m: the checkpoint does not match the config ({detail})")
    model.load_state_dict(sd)
    model._build_tables()  # position tables from the loaded buffers
    return model


def batch_from_ml4m(model, mod_dict: dict, num_encoder_tokens: int, num_decoder_tokens: int) -> FourMBatch:
    """4M's token selection, done once with a stable sort: valid tokens in concatenation order,
    then padding; decoder metadata from 4M's compressed decoder_attention_mask (cumsum rule)."""
    cfg: FourMConfig = model.cfg
    index = {n: i for i, n in enumerate(model.modalities)}
    if not mod_dict:
        raise ValueError("forward_ml4m: the batch holds no modalities")
    unknown = [n for n in mod_dict if n not in index]
    if unknown:
        raise ValueError(f"forward_ml4m: modalities {unknown} are not in the model ({model.modalities})")
    for what, n in (("num_encoder_tokens", num_encoder_tokens), ("num_decoder_tokens", num_decoder_tokens)):
        # a negative count sliced tokens off the end silently
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
            raise ValueError(f"forward_ml4m: {what} must be an int >= 0, got {n!r}")
    first = next(iter(mod_dict.values()))["tensor"]
    B, device = first.shape[0], first.device
    enc = {k: [] for k in ("ids", "mask", "mod", "pos")}
    dec = {k: [] for k in ("ids", "tgt", "valid", "mod", "pos", "dam")}
    for name, d in mod_dict.items():
        m = cfg.modality(name)
        if d["tensor"].shape[0] != B:
            raise ValueError(f"forward_ml4m: {name} holds a batch of {d['tensor'].shape[0]}, another modality {B}")
        if d["tensor"].is_floating_point() or d["tensor"].is_complex() or d["tensor"].dtype == torch.bool:
            # .long() truncated float ids silently
            raise ValueError(f"forward_ml4m: {name} holds {d['tensor'].dtype} token ids; they must be integers")
        t = d["tensor"].reshape(B, -1).long()
        L = t.shape[1]
        # ml-4m's layouts: an image's grid, a sequence of at most 2 (max_length + 1) (its span-masked
        # buffer); more tokens would read the next modality's rows of the shared position table
        want = m.buffer_size
        if (m.kind == "image" and L != want) or L > want:
            raise ValueError(f"forward_ml4m: {name} has {L} tokens per sample; the model's {m.kind} modality "
                             f"takes {'exactly' if m.kind == 'image' else 'at most'} {want}")
        if L and bool(((t < 0) | (t >= m.vocab_size)).any()):  # a host sync per modality; ml-4m's embedding raises too
            raise ValueError(f"forward_ml4m: {name} token ids outside [0, {m.vocab_size})")
        mod_col = torch.full((B, L), index[name], dtype=torch.long, device=device)
        # masks of another size than the tensor were reshaped to (B, -1) and misaligned the ids
        for key in ("input_mask", "target_mask", "decoder_attention_mask"):
            if key in d and d[key].numel() != B * L:
                raise ValueError(f"forward_ml4m: {name}'s {key} has shape {tuple(d[key].shape)}, but its tensor "
                                 f"{tuple(d['tensor'].shape)} holds {B} x {L} tokens")
        if name in model.encoder_embeddings:
            im = d["input_mask"].reshape(B, -1).bool()
            pos = torch.arange(L, device=device).expand(B, L) if m.kind == "image" else ((~im).long().cumsum(1) - 1).clamp(min=0)
            for k, v in (("ids", t), ("mask", im), ("mod", mod_col), ("pos", pos)):
                enc[k].append(v)
        if name in model.decoder_embeddings:
            tm = d["target_mask"].reshape(B, -1).bool()
            dam = d["decoder_attention_mask"].reshape(B, -1).long()
            if m.kind == "image":
                parts = (t, t, ~tm, mod_col, torch.arange(L, device=device).expand(B, L), dam)
            else:
                pos = (~tm).long().cumsum(1) - 1
                pos = torch.where(tm | (pos >= m.max_length), 0, pos)
                parts = (t[:, :-1], t[:, 1:], ~(tm[:, 1:] | tm[:, :-1]), mod_col[:, :-1], pos[:, :-1], dam[:, :-1])
            for k, v in zip(("ids", "tgt", "valid", "mod", "pos", "dam"), parts):
                dec[k].append(v)
    if not enc["ids"] or not dec["ids"]:
        raise ValueError("forward_ml4m: the batch needs at least one encoder and one decoder modality of the model")
    e = {k: torch.cat(v, 1) for k, v in enc.items()}
    order = torch.sort(e["mask"].to(torch.uint8), dim=1, stable=True).indices[:, :num_encoder_tokens]
    e = {k: v.gather(1, order) for k, v in e.items()}
    dd = {k: torch.cat(v, 1) for k, v in dec.items()}
    order = torch.sort((~dd["valid"]).to(torch.uint8), dim=1, stable=True).indices[:, :num_decoder_tokens]
    dd = {k: v.gather(1, order) for k, v in dd.items()}
    n = dd["ids"].shape[1]
    position = torch.arange(n, device=device, dtype=torch.int32).expand(B, n)
    if cfg.decoder_causal_mask:
        limit = position
    else:
        limit = (dd["dam"].cumsum(1) - 1).to(torch.int32)
    valid = dd["valid"]
    limit = torch.where(valid, limit, torch.full_like(limit, -1))
    segment = dd["mod"].to(torch.int32) if cfg.decoder_sep_mask else None
    dec_order, counts = decoder_order(dd["mod"], valid, len(model.modalities))
    return FourMBatch(e["ids"], e["mod"], e["pos"], ~e["mask"], dd["ids"], dd["tgt"], dd["mod"], dd["pos"], valid,
                      segment, position.contiguous(), limit.contiguous(), dec_order, counts,
                      decoder_mask=(cfg.decoder_sep_mask, cfg.decoder_causal_mask))


def ml4m_losses(model, b: FourMBatch, y: Tensor, mods: list[str], loss_type: str):
    """ml-4m's losses: "mod" averages the per-modality mean cross-entropies; "token" weights each
    modality's mean by its logits.numel() (targets x vocabulary), as ml-4m's forward_token_loss does."""
    if loss_type not in ("mod", "modality", "token"):
        raise ValueError(f"loss_type must be 'mod' or 'token', got {loss_type!r}")
    parts = model.modality_losses(b, y)
    per_mod = {n: parts[n][0] / parts[n][1] if parts[n][1] else y.new_zeros(()) for n in mods}
    if loss_type == "token":
        weights = {n: parts[n][1] * model.decoder_embeddings[n].to_logits.weight.shape[0] for n in mods}
        loss = sum(per_mod[n] * weights[n] for n in mods) / sum(weights.values())
    else:
        loss = sum(per_mod.values()) / len(per_mod)
    return loss, per_mod
