"""Masked attention from O(N) per-token metadata, with a backend dispatcher.

Backends, in priority order: ``fourm_fast`` (this library's kernels), ``flash_attn`` (varlen,
only for patterns it can express, when installed) and ``sdpa_dense`` (PyTorch SDPA with a dense
bool mask built from the metadata). ``backend=`` or FOURM_FAST_ATTENTION_BACKEND picks one; when
none fits, the error lists every backend with its reasons. Without a choice, the first that fits
runs, and passing over this library's kernels says why (a warning, once per reason); CUDA tensors
in a build without CUDA kernels raise instead (an installation problem, not a pattern the kernel
cannot take), as every fourm_fast op does. The environment variable is read when a call runs, and
under torch.compile when it is traced: compiled code keeps the backend it was traced with.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.attention import visible_mask

_FLOAT32_MAX = torch.finfo(torch.float32).max

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class AttentionInputs:
    q: Tensor
    k: Tensor
    v: Tensor
    k_valid: Tensor
    q_segment: Tensor | None
    k_segment: Tensor | None
    q_limit: Tensor | None
    k_rank: Tensor | None
    scale: float


_NO_CUDA_KERNELS = "this build has no CUDA kernels"
_cuda_build_problem_cached: str | None = None


@torch.compiler.assume_constant_result
def _cuda_build_problem() -> str:
    """Why this build cannot run the CUDA kernel ("" when it can). A constant to torch.compile:
    Dynamo cannot trace the extension's build_info, and a graph break here split every compiled
    model at each attention layer on the GPU. Cached: the build cannot change within a process, and
    asking it cost about 6 us on every eager attention call."""
    global _cuda_build_problem_cached
    if _cuda_build_problem_cached is None:
        from .._extension import extension

        if not extension().build_info()["cuda_compiled"]:
            _cuda_build_problem_cached = _NO_CUDA_KERNELS
        elif not torch._C._dispatch_has_kernel_for_dispatch_key("fourm_fast::masked_attention_fwd", "CUDA"):
            _cuda_build_problem_cached = "the CUDA masked_attention kernel is not implemented in this build"
        else:
            _cuda_build_problem_cached = ""
    return _cuda_build_problem_cached


@torch.compiler.assume_constant_result
def _cuda_capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


class Backend:
    name = "?"

    def not_supported_reasons(self, a: AttentionInputs) -> list[str]:
        raise NotImplementedError

    def __call__(self, a: AttentionInputs) -> Tensor:
        raise NotImplementedError


class FourmFastBackend(Backend):
    name = "fourm_fast"

    def not_supported_reasons(self, a):
        reasons = []
        if a.q.dtype not in _SUPPORTED:
            reasons.append(f"q is {a.q.dtype}; the kernels take float32, bfloat16 or float16")
        if a.q.device.type == "cuda":
            problem = _cuda_build_problem()
            if problem:
                reasons.append(problem)
            else:
                index = a.q.device.index if a.q.device.index is not None else torch.cuda.current_device()
                if _cuda_capability_major(index) < 8:
                    reasons.append("the CUDA kernel needs compute capability 8.0 or newer")
        elif a.q.device.type != "cpu":
            reasons.append(f"device {a.q.device.type} is not supported")
        return reasons

    def __call__(self, a):
        out, _ = torch.ops.fourm_fast.masked_attention_fwd.default(
            a.q, a.k, a.v, a.k_valid, a.q_segment, a.k_segment, a.q_limit, a.k_rank, a.scale)
        return out


class SdpaDenseBackend(Backend):
    """PyTorch SDPA with a (B, 1, Nq, Nk) bool mask: materialises the N x N mask."""

    name = "sdpa_dense"

    def not_supported_reasons(self, a):
        return []

    def __call__(self, a):
        vis = visible_mask(a.k_valid, a.q.shape[2], a.q_segment, a.k_segment, a.q_limit, a.k_rank)[:, None]
        out = F.scaled_dot_product_attention(a.q, a.k, a.v, attn_mask=vis, scale=a.scale)
        # SDPA returns NaN for queries that see nothing; the op's contract is zeros.
        return out.masked_fill(~vis.any(-1, keepdim=True), 0.0)


class FlashAttnBackend(Backend):
    """flash-attn's varlen kernel for the padding-only pattern (encoder self-attention, decoder
    cross-attention): each batch row is one sequence of its Nq queries over its valid keys, packed
    with index_select; rows without a valid key are left out and output zeros. flash-attn's varlen
    API takes the longest key count as a host int, and the packing indices come from nonzero: a
    call syncs with the device three times.
    Segments and ranks (4M's decoder self-attention: bidirectional and causal modalities in one
    row) have no varlen form and are rejected. The data-dependent packing does not trace into
    one graph: under torch.compile(fullgraph=True) use another backend."""

    name = "flash_attn"
    MAX_HEAD_DIM = 256  # flash-attn 2's largest head dim; it also needs d % 8 == 0

    def not_supported_reasons(self, a):
        reasons = []
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            reasons.append("flash-attn is not installed")
        if a.q.device.type != "cuda":
            reasons.append("flash-attn runs on CUDA only")
        if a.q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append("flash-attn needs float16 or bfloat16")
        d = a.q.shape[-1]
        if d % 8 or d > self.MAX_HEAD_DIM:
            reasons.append(f"flash-attn needs a head dim that is a multiple of 8 and at most {self.MAX_HEAD_DIM}, got {d}")
        if a.q_segment is not None or a.q_limit is not None:
            reasons.append("segment/rank masks are not expressible as flash-attn varlen sequences")
        return reasons

    def __call__(self, a):
        from flash_attn import flash_attn_varlen_func

        B, H, Nq, d = a.q.shape
        Nk = a.k.shape[2]
        counts = a.k_valid.sum(1, dtype=torch.int32)  # keys per batch row
        rows = torch.nonzero(counts > 0).squeeze(1)  # rows with a key: one varlen sequence each
        k_idx = torch.nonzero(a.k_valid.reshape(-1)).squeeze(1)
        q_idx = (rows[:, None] * Nq + torch.arange(Nq, device=rows.device)).reshape(-1)

        def packed(t, n, idx):  # (B, H, n, d) -> (len(idx), H, d): the rows of t at token ids idx
            # one gather from the (B, n, H, d) view, without first copying t into that layout
            return t.transpose(1, 2)[idx // n, idx % n]

        cu_k = F.pad(counts[rows].cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(rows.numel() + 1, device=rows.device, dtype=torch.int32) * Nq
        max_k = int(counts.max()) if counts.numel() else 0  # a host sync, as the two nonzero calls
        out = a.q.new_zeros(B * Nq, H, d)
        if rows.numel() and Nq:
            o = flash_attn_varlen_func(packed(a.q, Nq, q_idx), packed(a.k, Nk, k_idx), packed(a.v, Nk, k_idx), cu_q, cu_k,
                                       Nq, max_k, softmax_scale=a.scale, causal=False)
            out = out.index_copy(0, q_idx, o.to(out.dtype))
        return out.reshape(B, Nq, H, d).transpose(1, 2)


BACKENDS: dict[str, Backend] = {b.name: b for b in (FourmFastBackend(), FlashAttnBackend(), SdpaDenseBackend())}


def select_backend(a: AttentionInputs, backend: str | None = None) -> Backend:
    """The first backend that supports the inputs; with `backend` (or the environment override
    FOURM_FAST_ATTENTION_BACKEND) only that one, raising with its reasons if it cannot run."""
    wanted = backend or os.environ.get("FOURM_FAST_ATTENTION_BACKEND") or None
    if wanted is not None and wanted not in BACKENDS:
        raise ValueError(f"masked_attention: unknown backend {wanted!r}; choose from {sorted(BACKENDS)}")
    order = [BACKENDS[wanted]] if wanted else list(BACKENDS.values())
    rejected = []
    for b in order:
        reasons = b.not_supported_reasons(a)
        if not reasons:
            if rejected and not wanted:
                _note_fallback(b.name, rejected)
            return b
        if not wanted and b.name == "fourm_fast" and _NO_CUDA_KERNELS in reasons:
            raise RuntimeError("masked_attention: CUDA tensors, but this fourm_fast build has no CUDA kernels "
                               "(rebuild with FOURM_FAST_CUDA=1 where nvcc is available; `fourm-fast info` shows the "
                               "build), or pass backend='sdpa_dense' for PyTorch SDPA with a dense N x N mask")
        rejected.append(f"  {b.name}: " + "; ".join(reasons))
    raise RuntimeError("masked_attention: no backend can run these inputs:\n" + "\n".join(rejected))


_warned: set[tuple[str, ...]] = set()


def _note_fallback(chosen: str, rejected: list[str]) -> None:
    key = (chosen, *rejected)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"masked_attention: running the {chosen} backend; passed over:\n" + "\n".join(rejected)
                      + "\n(pass backend= or set FOURM_FAST_ATTENTION_BACKEND to choose one and silence this)",
                      stacklevel=3)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, k_valid: Tensor, q_segment: Tensor | None = None,
                     k_segment: Tensor | None = None, q_limit: Tensor | None = None, k_rank: Tensor | None = None,
                     scale: float | None = None, backend: str | None = None) -> Tensor:
    """Attention whose mask is computed on the fly from per-token metadata.

    Args:
        q: ``(B, H, Nq, d)``; k, v: ``(B, H, Nk, d)``; float32 / bfloat16 / float16, strided views ok.
        k_valid: ``(B, Nk)`` bool, False for padding keys.
        q_segment, k_segment: ``(B, Nq)``, ``(B, Nk)`` int32 or None: attend within a segment only.
        q_limit, k_rank: ``(B, Nq)``, ``(B, Nk)`` int32 or None: key j visible iff k_rank[j] <= q_limit[i].
        scale: score scale, default ``d ** -0.5``; a real number within float32's range.
        backend: "fourm_fast", "flash_attn", "sdpa_dense" or None (first that fits).

    Under autocast, q, k and v run in the autocast dtype (as SDPA does); float64 is left alone.

    Returns:
        ``(B, H, Nq, d)`` in q's dtype. A query that sees no key outputs zeros (zero gradients).

    Values are not checked for NaN or inf (that would cost a pass over K and V). A non-finite value
    in a visible key propagates, as in any attention. Rows of masked keys must hold finite values
    too: as with SDPA or 4M's additive mask, a masked key gets weight 0, and 0 * NaN is NaN. Whether
    such a row reaches an output depends on the backend's tiling; the CPU tiles, for example, skip
    trailing padding keys but not masked keys between visible ones. Finite masked rows of any size
    are safe on the fourm_fast backend: where a key's weight is 0 its score gradient is 0, even when
    dO V^T overflows (SDPA gives NaN gradients there). The CUDA kernel's fp16
    backward rounds the score gradient dS to fp16 for its tensor cores, as FlashAttention does, so
    |dS| beyond 65504 (large loss scales) overflows; the CPU computes in float32.
    """
    # Rank and k_valid first: the scale below reads q's last dim (a 0-d or 3-D q failed with an
    # IndexError or a ZeroDivisionError, a missing k_valid with "tensor does not have a device").
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v)):
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__ for t in (q, k, v))
        raise ValueError(f"masked_attention: q, k, v must be 4-D (B, H, N, d) tensors, got {shapes}")
    if not isinstance(k_valid, Tensor):
        raise TypeError(f"masked_attention: k_valid must be a bool (B, Nk) tensor, got {type(k_valid).__name__}")
    if q.shape[-1] == 0:
        raise ValueError("masked_attention: head dim must be positive")
    dev = q.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        # As SDPA under autocast: q, k, v in the autocast dtype, float64 left alone. (CUDA autocast
        # runs LayerNorm in float32, so QK-norm hands over float32 q, k next to a bfloat16 v.)
        dt = torch.get_autocast_dtype(dev)
        q, k, v = (t.to(dt) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v))
    if scale is None:  # (finite for d >= 1; under dynamic shapes a symbolic float, left unchecked)
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        if isinstance(scale, Tensor) and scale.requires_grad and torch.is_grad_enabled():
            raise TypeError("masked_attention: scale is a number; a tensor that requires grad would get no "
                            "gradient (scale q instead: masked_attention(q * s, k, v, ..., scale=1.0))")
        # SymFloat / SymInt: a scale made of a symbolic shape while tracing (make_fx, export)
        if isinstance(scale, (bool, str)) or not isinstance(scale, (numbers.Real, Tensor, torch.SymFloat, torch.SymInt)):
            raise TypeError(f"masked_attention: scale must be a real number, got {type(scale).__name__}")
        if isinstance(scale, Tensor) and (scale.numel() != 1 or scale.dtype.is_complex or scale.dtype == torch.bool):
            raise TypeError(f"masked_attention: scale must be a real number or a one-element real tensor, got a "
                            f"{scale.dtype} tensor of shape {tuple(scale.shape)}")
        try:
            scale = float(scale)
        except OverflowError:  # an int beyond a double
            scale = math.inf
        # the kernels take it as a float32: a double beyond float32's range would become inf there
        # (scores times a finite scale can still overflow: values are not checked, see above)
        if not math.isfinite(scale) or abs(scale) > _FLOAT32_MAX:
            raise ValueError(f"masked_attention: scale must be finite in float32 (|scale| <= {_FLOAT32_MAX:.4g}), got {scale}")
    a = AttentionInputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank, scale)
    chosen = select_backend(a, backend)
    if chosen.name != "fourm_fast":
        # the op checks its inputs in C++ (and in its fake impl); the other backends get the same
        # checks here (they took bad metadata silently or failed obscurely)
        _check_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank, dtypes=None,
                      check_value=_raise_value, check_type=_raise_type)
    return chosen(a)


def _raise_value(ok, message) -> None:
    if not ok:
        raise ValueError(message())


def _raise_type(ok, message) -> None:
    if not ok:
        raise TypeError(message())


def _check_inputs(q, k, v, k_valid, q_segment=None, k_segment=None, q_limit=None, k_rank=None, dtypes=_SUPPORTED,
                  check_value=torch._check_value, check_type=torch._check_type):
    """The C++ checks (csrc/attention_checks.h) on shapes, dtypes and devices, with its messages.
    In the fake impl (torch._check: a graph that could not run fails when it is traced), and in
    the wrapper for every backend (plain raises, which Dynamo traces; dtypes=None: any floating q,
    as SDPA takes float64)."""
    check_value(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                lambda: f"masked_attention: q, k, v must be 4-D (B, H, N, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if dtypes is None:
        check_type(q.is_floating_point(), lambda: f"masked_attention: q must be a floating tensor, got {q.dtype}")
    else:
        check_type(q.dtype in dtypes, lambda: f"masked_attention: q must be float32, bfloat16 or float16, got {q.dtype}")
    check_type(k.dtype == q.dtype and v.dtype == q.dtype,
               lambda: f"masked_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # (one device for all: a lone meta tensor would otherwise route the call to the fake impl and
    # return uninitialised memory)
    for name, t in (("k", k), ("v", v), ("k_valid", k_valid), ("q_segment", q_segment), ("k_segment", k_segment),
                    ("q_limit", q_limit), ("k_rank", k_rank)):
        if t is not None:
            check_value(t.device == q.device,
                        lambda: f"masked_attention: {name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    sizes = lambda: f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"  # noqa: E731
    check_value(k.shape[0] == B and v.shape[0] == B, lambda: f"masked_attention: batch sizes differ: {sizes()}")
    check_value(k.shape[1] == H and v.shape[1] == H, lambda: f"masked_attention: head counts differ: {sizes()}")
    check_value(v.shape[2] == Nk, lambda: f"masked_attention: k and v must have the same number of keys, got {sizes()}")
    check_value(k.shape[3] == q.shape[3] and v.shape[3] == q.shape[3], lambda: f"masked_attention: head dims differ: {sizes()}")
    check_type(k_valid.dtype == torch.bool, lambda: f"masked_attention: k_valid must be bool, got {k_valid.dtype}")
    check_value(k_valid.dim() == 2 and k_valid.shape[0] == B and k_valid.shape[1] == Nk,
                lambda: f"masked_attention: k_valid must have shape ({B}, {Nk}), got {tuple(k_valid.shape)}")
    for a_name, a, b_name, b in (("q_segment", q_segment, "k_segment", k_segment), ("q_limit", q_limit, "k_rank", k_rank)):
        check_value((a is None) == (b is None), lambda: f"masked_attention: give both {a_name} and {b_name}, or neither")
        for name, t, n in ((a_name, a, Nq), (b_name, b, Nk)):
            if t is not None:
                check_type(t.dtype == torch.int32, lambda: f"masked_attention: {name} must be int32, got {t.dtype}")
                check_value(t.dim() == 2 and t.shape[0] == B and t.shape[1] == n,
                            lambda: f"masked_attention: {name} must have shape ({B}, {n}), got {tuple(t.shape)}")


@torch.library.register_fake("fourm_fast::masked_attention_fwd")
def _fwd_fake(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank, scale):
    _check_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank)
    B, H, Nq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.register_fake("fourm_fast::masked_attention_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, k_valid, q_segment, k_segment, q_limit, k_rank, scale):
    _check_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank)
    torch._check_value(grad_out.shape == q.shape and out.shape == q.shape,
                       lambda: f"masked_attention backward: grad_out and out must have q's shape {tuple(q.shape)}, "
                               f"got {tuple(grad_out.shape)} and {tuple(out.shape)}")
    torch._check_value(lse.shape == q.shape[:3] and lse.dtype == torch.float32,
                       lambda: f"masked_attention backward: lse must be float32 {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")
    torch._check_type(grad_out.dtype in _SUPPORTED and out.dtype in _SUPPORTED,
                      lambda: "masked_attention backward: grad_out and out must be float32, bfloat16 or float16, "
                              f"got {grad_out.dtype if grad_out.dtype not in _SUPPORTED else out.dtype}")
    c = torch.contiguous_format
    return torch.empty_like(q, memory_format=c), torch.empty_like(k, memory_format=c), torch.empty_like(v, memory_format=c)


def _setup_context(ctx, inputs, output):
    q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # lse never gets a gradient: no zeros tensor for it each backward
    ctx.save_for_backward(q, k, v, out, lse, k_valid, q_segment, k_segment, q_limit, k_rank)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, k_valid, q_segment, k_segment, q_limit, k_rank = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 9
    # grad_out usually arrives as a transposed view (nn.Attention reshapes out.transpose(1, 2)): the
    # CPU executor reads such rows in place; the CUDA kernel takes it contiguous.
    g = grad_out if grad_out.device.type == "cpu" else grad_out.contiguous()
    dq, dk, dv = torch.ops.fourm_fast.masked_attention_bwd.default(
        g, q, k, v, out, lse, k_valid, q_segment, k_segment, q_limit, k_rank, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("fourm_fast::masked_attention_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("masked_attention: double backward (a gradient of its gradients) is not supported; "
                       "for second-order terms use backend='sdpa_dense'")


# Without this a create_graph backward would warn and then drop the second-order terms silently.
torch.library.register_autograd("fourm_fast::masked_attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
