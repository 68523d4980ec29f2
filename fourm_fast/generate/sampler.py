"""Any-to-any generation with a FourM: MaskGIT, ROAR and autoregressive steps, chained over targets.

What differs from ml-4m's GenerationSampler (fourm/models/generate.py), in how and not what:
- MaskGIT and ROAR schedules are per sample, over each sample's own number of unknown tokens
  (4M takes sample 0's count for the whole batch).
- Classifier-free guidance runs the conditional and unconditional passes as one batched forward
  (4M deep-copies the batch and runs them one after the other); several weighted conditions
  (u + sum_i w_i (c_i - u)) run as one forward too.
- Autoregressive targets decode with a key/value cache and stop per sample at the end sentinel.
- Every draw goes through fourm_fast.ops.sample_tokens (Philox: a seed gives the same tokens on
  CPU and CUDA) and MaskGIT's choice through select_positions; sampling never sorts the vocabulary.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..nn.few_rows import FEW_ROWS_MAX, few_rows_layer
from ..ops.masking import int64_counter
from ..ops.sampling import sample_tokens, select_positions
from .kv_cache import CachedDecoder, UncachedDecoder
from .schedules import TargetSpec, per_sample_table
from .state import GenerationState, Slots


def _filters(spec: TargetSpec) -> dict:
    # 4M's conventions: top_p 0 is off (the op's "off" is 1); top_k a count or a fraction.
    top_p = spec.top_p if 0.0 < spec.top_p < 1.0 else 1.0
    return dict(top_k=spec.top_k, top_p=top_p, min_p=spec.min_p)


class Generator:
    """Chained generation on a FourM.

    sentinel_ids: per sequence modality, the ids of its sentinels in 4M's order (entry s is [S_s]:
    a TextTokenizer's ``sentinel_ids``); [S_1] starts a generated sequence and [S_2] ends it.
    use_cache: autoregressive decoding with the key/value cache (False: 4M's full re-run).
    log: called with a progress line per MaskGIT / ROAR step and one per autoregressive target
        (None: quiet).
    """

    def __init__(self, model, sentinel_ids: dict[str, list[int]] | None = None, use_cache: bool = True,
                 log: Callable[[str], None] | None = None):
        self.model = model
        self.sentinels = {k: list(v) for k, v in (sentinel_ids or {}).items()}
        for name, ids in self.sentinels.items():
            if len(ids) < 3:
                raise ValueError(f"{name}: need the ids of at least [S_0], [S_1], [S_2], got {ids}")
            # [S_1] is fed to the decoder as is (the cached step does not check its slots)
            vocab = model.cfg.modality(name).vocab_size if name in model.modalities else None
            if vocab is not None and not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab
                                             for i in ids[:3]):
                raise ValueError(f"{name}: sentinel ids {ids[:3]} must be ints in [0, {vocab}), the modality's vocabulary")
        self.use_cache = use_cache
        self.log = log
        self._enc_key = None
        self._enc_val = None
        self._logits_ws: Tensor | None = None
        self.stats = {"encoder_passes": 0, "decoder_passes": 0, "sampled_rows": 0}

    # ---- helpers ------------------------------------------------------------------------------
    def new_state(self, batch_size: int, device=None) -> GenerationState:
        dev = device if device is not None else next(self.model.parameters()).device
        return GenerationState(self.model, batch_size, dev)

    def _s1(self) -> dict[str, int]:
        return {n: ids[1] for n, ids in self.sentinels.items()}

    def _encode(self, state: GenerationState, passes: list[set[str]]):
        """Encoder output of the passes stacked on the batch axis ([P * B, Ne]); reused while the
        state's inputs have not changed. Each pass is encoded at its own length (an unconditional
        pass is often much shorter) and the contexts are then padded to one length."""
        key = (state.uid, state.version, tuple(tuple(sorted(p)) for p in passes))
        if key != self._enc_key:
            outs = [self.model.encode(state.encoder_slots(self.model, [p], self._s1())) for p in passes]
            n = max(c.shape[1] for c, _ in outs)
            ctx = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, n - c.shape[1])) for c, _ in outs])
            valid = torch.cat([torch.nn.functional.pad(v, (0, n - v.shape[1])) for _, v in outs])
            self._enc_val = (ctx, valid)
            self._enc_key = key
            self.stats["encoder_passes"] += len(passes)
        return self._enc_val

    def _passes(self, state: GenerationState, spec: TargetSpec) -> tuple[list[set[str]], list[float] | None]:
        """Visible modalities of each forward pass, and the guidance weights (None: unguided).
        Passes are [c_1, ..., c_k, u]; the target's own tokens are visible in every pass."""
        present = {n for n in state.tokens if n != spec.name} | {spec.name}
        if spec.guidance:
            hidden = set().union(*(set(m) for m, _ in spec.guidance))
            self._check_known(state, hidden, spec)
            base = present - hidden
            return [base | set(m) for m, _ in spec.guidance] + [base], [float(w) for _, w in spec.guidance]
        cond = set(spec.cfg_conditions) if spec.cfg_conditions is not None else present - {spec.name}
        self._check_known(state, cond, spec)
        if spec.cfg_scale == 1.0 or not cond:
            return [present], None
        return [present, present - cond], [spec.cfg_scale]

    def _check_known(self, state: GenerationState, mods: set[str], spec: TargetSpec) -> None:
        missing = sorted(m for m in mods if m not in state.tokens)
        if missing:
            raise ValueError(f"target {spec.name!r}: guidance names {missing}, which are neither given nor generated before it")
        if spec.name in mods:
            raise ValueError(f"target {spec.name!r}: a target cannot guide itself")

    def _guided_logits(self, name: str, y: Tensor, P: int, weights: list[float] | None) -> Tensor:
        """Target-head logits of the guided decoder output. The head is affine and the weights of
        u + sum_i w_i (c_i - u) add up to 1, so that combination of the logits equals the head
        applied to the same combination of the hidden states (a bias too, were there one): one
        (R, dim) x (dim, V) product instead of P. An autoregressive step has a few rows, for which
        fourm_fast.nn.few_rows streams the head through rows_linear."""
        layer = self.model.decoder_embeddings[name].to_logits

        def head(rows: Tensor) -> Tensor:
            if (rows.shape[0] <= FEW_ROWS_MAX or rows.device.type != "cpu" or rows.dtype != layer.weight.dtype
                    or torch.is_autocast_enabled("cpu")):
                return few_rows_layer(layer, rows)
            # Many rows on the CPU (an image step): the logits go to a buffer kept across the
            # steps of one generate() call. Fresh, the 784 x 16384 float32 logits of a guided
            # batch of 4 (51 MB, past glibc's largest mmap threshold) were page-faulted in on every
            # step: that product took 44 ms, 33 ms into a reused buffer (2-core Xeon). Every
            # caller hands them straight to sample_tokens, before the next step overwrites them.
            out = self._workspace(rows.shape[0], layer.weight.shape[0], rows)
            torch.mm(rows, layer.weight.t(), out=out)
            return out if layer.bias is None else out.add_(layer.bias)

        R = y.shape[0] // P
        if weights is None:
            return head(y)
        u = y[-R:]
        g = u.clone()
        for i, w in enumerate(weights):
            g += w * (y[i * R:(i + 1) * R] - u)
        return head(g)

    def _workspace(self, rows: int, cols: int, like: Tensor) -> Tensor:
        """A (rows, cols) view of the logits buffer, grown (never shrunk) as needed."""
        n = rows * cols
        ws = self._logits_ws
        if ws is None or ws.numel() < n or ws.dtype != like.dtype or ws.device != like.device:
            ws = self._logits_ws = torch.empty(n, dtype=like.dtype, device=like.device)
        return ws[:n].view(rows, cols)

    def _sample(self, logits: Tensor, spec: TargetSpec, temperature: Tensor | float, seed: int) -> tuple[Tensor, Tensor]:
        offset = self._offset
        self._offset += 1
        self.stats["sampled_rows"] += logits.shape[0]
        return sample_tokens(logits, temperature=temperature, seed=seed, offset=offset, **_filters(spec))

    # ---- the chain ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, state: GenerationState, targets: list[TargetSpec], seed: int = 0) -> GenerationState:
        """Generate each target in turn; later targets see earlier ones. Modifies and returns state.
        Every target is checked before any is generated (a bad last target leaves the state as it was)."""
        # the seed too: sample_tokens checked it only after the targets' empty entries were added
        int64_counter(seed, "seed", "generate")
        names = [spec.name for spec in targets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"targets {twice} appear more than once; each target is generated once per call")
        # what each target may be guided by: modalities given (something known) or generated before it
        available = {n for n, k in state.known.items() if bool(k.any())}
        for spec in targets:
            if spec.name not in self.model.decoder_embeddings:
                raise ValueError(f"target {spec.name!r}: the model does not decode it (outputs: {list(self.model.decoder_embeddings)})")
            kind = self.model.cfg.modality(spec.name).kind
            if (kind == "sequence") != (spec.scheme == "autoregressive"):
                raise ValueError(f"target {spec.name!r} is a {kind} modality: use "
                                 f"{'autoregressive' if kind == 'sequence' else 'maskgit or roar'}, not {spec.scheme}")
            if kind == "sequence" and spec.name not in self.sentinels:
                raise ValueError(f"target {spec.name!r}: sentinel ids are needed to start and stop a sequence")
            if kind == "sequence" and spec.name in state.known and bool(state.known[spec.name].any()):
                raise ValueError(f"target {spec.name!r} already has tokens; sequence targets are generated from scratch")
            named = set().union(*(set(mods) for mods, _ in spec.guidance)) if spec.guidance else set(spec.cfg_conditions or ())
            if spec.name in named:
                raise ValueError(f"target {spec.name!r}: a target cannot guide itself")
            unseen = sorted(n for n in named if n not in self.model.encoder_embeddings)
            if unseen:
                raise ValueError(f"target {spec.name!r}: guidance names {unseen}, which the model's encoder does not "
                                 f"take (inputs: {list(self.model.encoder_embeddings)}): it could change nothing")
            missing = sorted(named - available)
            if missing:
                raise ValueError(f"target {spec.name!r}: guidance names {missing}, which are neither given (with known "
                                 f"tokens) nor generated before it")
            available.add(spec.name)
        for spec in targets:  # 4M adds every target up front: later sequence targets show as [S_1]
            if spec.name not in state.tokens:
                state.add_empty(spec.name)
        self._offset = 0
        try:
            for ti, spec in enumerate(targets):
                if spec.scheme == "autoregressive":
                    self._autoregressive(state, spec, seed)
                else:
                    self._image(state, spec, seed, ti)
        finally:
            self._enc_key = self._enc_val = None  # do not hold the last encoder output
            self._logits_ws = None  # nor the logits buffer
        return state

    def _image(self, state: GenerationState, spec: TargetSpec, seed: int, target_index: int) -> None:
        name = spec.name
        known = state.known[name]
        B, N = known.shape
        unknown = (~known).sum(1).tolist()
        table = per_sample_table(spec, unknown)
        passes, weights = self._passes(state, spec)
        P = len(passes)
        mod_id = self.model.modalities.index(name)
        dev = known.device
        if spec.scheme == "roar":
            # a random order per sample over its unknown positions, drawn once (unknown first)
            g = torch.Generator().manual_seed((seed * 1_000_003 + target_index) % (2**63))
            keys = torch.rand(B, N, generator=g).to(dev)
            order = torch.argsort(torch.where(known, 2.0, keys), dim=1)
            taken = torch.zeros(B, dtype=torch.int64, device=dev)
        for s in range(table.counts.shape[0]):
            counts = torch.from_numpy(table.counts[s]).to(dev)
            if not bool((counts > 0).any()):
                continue  # a step that commits nothing changes nothing (4M's cosine has such steps)
            if spec.scheme == "maskgit":
                Q = int((~state.known[name]).sum(1).max())
                qpos = torch.sort(state.known[name].to(torch.uint8), dim=1, stable=True).indices[:, :Q]
                qvalid = ~state.known[name].gather(1, qpos)
            else:
                Q = int(counts.max())
                j = torch.arange(Q, device=dev)[None, :]
                qpos = order.gather(1, (taken[:, None] + j).clamp(max=N - 1))
                qvalid = j < counts[:, None]
                taken += counts
            context, context_valid = self._encode(state, passes)
            slots = Slots(dec_ids=torch.zeros(P * B, Q, dtype=torch.int64, device=dev),
                          dec_modality=torch.full((P * B, Q), mod_id, device=dev),
                          dec_position=qpos.repeat(P, 1), dec_valid=qvalid.repeat(P, 1))
            y = self.model.decode(slots, context, context_valid)
            self.stats["decoder_passes"] += 1
            logits = self._guided_logits(name, y.reshape(P * B * Q, -1), P, weights)
            temp = torch.from_numpy(table.temps[s]).float().to(dev).repeat_interleave(Q)
            tokens, probs = self._sample(logits, spec, temp, seed)
            tokens, probs = tokens.reshape(B, Q), probs.reshape(B, Q)
            if spec.scheme == "maskgit":
                chosen = select_positions(probs, qvalid, counts)
            else:
                chosen = qvalid
            state.commit(name, qpos, tokens, chosen)
            if self.log:
                self.log(f"generate {name}: {spec.scheme} step {s + 1}/{table.counts.shape[0]}")
        if not bool(state.known[name].all()):
            raise RuntimeError(f"{name}: the schedule left tokens undecided (internal error)")

    def _autoregressive(self, state: GenerationState, spec: TargetSpec, seed: int) -> None:
        name = spec.name
        m = self.model.cfg.modality(name)
        s1, s2 = self.sentinels[name][1], self.sentinels[name][2]
        # 4M's empty target holds [S_1] as input and max_length - 1 decoder positions
        limit = m.max_length - 1 if spec.max_length is None else min(spec.max_length, m.max_length - 1)
        passes, weights = self._passes(state, spec)
        P, B, dev = len(passes), state.B, state.device
        context, context_valid = self._encode(state, passes)
        cls = CachedDecoder if self.use_cache else UncachedDecoder
        dec = cls(self.model, name, context, context_valid, limit)
        ids = torch.full((B,), s1, dtype=torch.int64, device=dev)
        out = torch.zeros(B, limit, dtype=torch.int64, device=dev)
        length = torch.zeros(B, dtype=torch.int64, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        temp = spec.temperature
        for t in range(limit):
            y = dec.step(ids.repeat(P))
            self.stats["decoder_passes"] += 1
            tok, _ = self._sample(self._guided_logits(name, y, P, weights), spec, temp, seed)
            ended = tok == s2
            write = ~done & ~ended
            out[:, t] = torch.where(write, tok, 0)
            length += write.long()
            done |= ended
            if bool(done.all()):
                break
            ids = tok
        # the generated tokens replace [S_1]: the sequence is what came between [S_1] and [S_2]
        known = torch.arange(limit, device=dev)[None, :] < length[:, None]
        state.tokens[name] = torch.zeros(B, m.max_length, dtype=torch.int64, device=dev)
        state.known[name] = torch.zeros(B, m.max_length, dtype=torch.bool, device=dev)
        state.tokens[name][:, :limit] = torch.where(known, out, 0)
        state.known[name][:, :limit] = known
        state.version += 1
        if self.log:
            self.log(f"generate {name}: autoregressive, {int(length.max())} tokens at most")


def decode_images(state: GenerationState, tokenizers: dict) -> dict[str, np.ndarray]:
    """Image modalities of the state through their VQ tokenizers: name -> uint8 (B, H, W, 3)."""
    from ..tokenizers.vq import to_display

    out = {}
    for name, tok in tokenizers.items():
        if name not in state.tokens or state.cfg.modality(name).kind != "image":
            continue
        g = int(math.isqrt(state.tokens[name].shape[1]))
        with torch.no_grad():
            x = tok.decode(state.tokens[name].reshape(-1, g, g).cpu())
        out[name] = to_display(name, x)
    return out
