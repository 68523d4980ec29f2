"""Nearest-code lookup for vector quantisation (fused distance + argmin; never N x K in memory)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_METRICS = ("l2", "cosine")
# F.normalize's epsilon (csrc/kernels/vq_math.h uses the same).
NORM_EPS = 1e-12


def vq_lookup(x: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Nearest code of every row of ``x``.

    Args:
        x: ``(..., D)`` float32 / bfloat16 / float16, any strides.
        codebook: ``(K, D)``, same dtype and device as ``x``, K >= 1.
        metric: ``"l2"``: minimise ``|x - c|^2``; ``"cosine"``: maximise ``<x, c> / (|x| |c|)``
            (both sides normalised, as 4M's cosine codebooks).

    Returns:
        indices: ``(...)`` int64, the winning code; ties go to the smallest index.
        distance: ``(...)`` float32, the exact distance to that code recomputed in fp32:
            squared L2, or cosine distance ``1 - cos`` in [0, 2].

    Accumulation is fp32 for every input dtype. For cosine in bf16/fp16, each normalised code is
    rounded to the input dtype before the dot product (the GPU's tensor cores take it that way,
    and the CPU does the same), so picks can differ from an fp32 ranking on near-ties. A row
    holding NaN or inf gets index -1 and distance NaN (no host sync is spent checking;
    ``vq_dequantize`` rejects -1). A code with a non-finite entry, or whose float32 ``|c|^2``
    overflows (entries beyond about 1.8e19), is never selected. The search ranks float32 dot
    products: where ``<x, c>`` overflows (``|x| |c|`` beyond about 1e38) the ranking is undefined,
    and a finite row whose every score overflows gets index -1 like a non-finite one. The returned
    cosine distance is computed without overflow at any finite magnitude. ``distance`` is
    differentiable in ``x`` and ``codebook``.
    """
    return torch.ops.fourm_fast.vq_lookup.default(x, codebook, metric)


def _check_inputs(x: Tensor, codebook: Tensor, metric: str) -> None:
    # Mirrors csrc/vq_checks.h so traced/compiled code raises the same errors as eager.
    torch._check_value(metric in _METRICS, lambda: f'vq_lookup: metric must be "l2" or "cosine", got "{metric}"')
    torch._check_value(codebook.dim() == 2, lambda: f"vq_lookup: codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    torch._check_value(x.dim() >= 1, lambda: "vq_lookup: x must have at least one dimension (..., D)")
    torch._check_value(codebook.shape[0] > 0, lambda: "vq_lookup: the codebook is empty (K = 0)")
    torch._check_value(codebook.shape[1] > 0, lambda: "vq_lookup: code dimension D must be positive")
    torch._check_value(codebook.shape[0] <= 2**31 - 1, lambda: "vq_lookup: at most 2^31-1 codes are supported")
    torch._check_value(
        x.shape[-1] == codebook.shape[1],
        lambda: f"vq_lookup: x has D = {x.shape[-1]} but the codebook has D = {codebook.shape[1]}",
    )
    torch._check_type(x.dtype in _SUPPORTED, lambda: f"vq_lookup: x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check_type(
        x.dtype == codebook.dtype,
        lambda: f"vq_lookup: x and codebook must share a dtype, got {x.dtype} and {codebook.dtype} (cast one of them)",
    )
    torch._check_value(
        x.device == codebook.device,
        lambda: f"vq_lookup: x and codebook must be on the same device, got {x.device} and {codebook.device}",
    )


@torch.library.register_fake("fourm_fast::vq_lookup")
def _vq_lookup_fake(x: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    _check_inputs(x, codebook, metric)
    shape = x.shape[:-1]
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, codebook, metric = inputs
    indices, _ = output
    ctx.metric = metric
    ctx.save_for_backward(x, codebook, indices)


def _backward(ctx, grad_indices, grad_distance):
    """Gradient of the returned distance; rows with index -1 get zero gradient."""
    x, codebook, indices = ctx.saved_tensors
    if grad_distance is None:
        return None, None, None
    valid = (indices >= 0).unsqueeze(-1)
    safe = indices.clamp_min(0)
    xf = x.float()
    code = codebook.float()[safe]  # (..., D): only the winners, O(N * D)
    g = grad_distance.float().unsqueeze(-1)
    if ctx.metric == "l2":
        grad_x_rows = 2.0 * g * (xf - code)
        grad_c_rows = -grad_x_rows
    else:
        nx = xf.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        nc = code.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        u, w = xf / nx, code / nc
        cos = (u * w).sum(-1, keepdim=True)
        grad_x_rows = -g * (w - cos * u) / nx
        grad_c_rows = -g * (u - cos * w) / nc
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x_rows = torch.where(valid, grad_x_rows, zero)
    grad_c_rows = torch.where(valid, grad_c_rows, zero)
    grad_x = grad_x_rows.to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_c = None
    if ctx.needs_input_grad[1]:
        D = codebook.shape[1]
        grad_c = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        grad_c.index_add_(0, safe.reshape(-1), grad_c_rows.reshape(-1, D))
        grad_c = grad_c.to(codebook.dtype)
    return grad_x, grad_c, None


torch.library.register_autograd("fourm_fast::vq_lookup", _backward, setup_context=_setup_context)


def vq_dequantize(indices: Tensor, codebook: Tensor, *, validate: bool = True) -> Tensor:
    """Gather codes: ``codebook[indices]``.

    Args:
        indices: ``(...)`` int64/int32 code ids in ``[0, K)``.
        codebook: ``(K, D)`` any float dtype.
        validate: check the range in eager mode and raise IndexError naming the bad id (on CUDA
            this costs one device sync; -1 is what vq_lookup returns for a NaN/inf row). Skipped
            inside torch.compile graphs.

    Returns:
        ``(..., D)`` codes in ``codebook.dtype``, differentiable in ``codebook``.
    """
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vq_dequantize: indices must be int64 or int32, got {indices.dtype}")
    if codebook.dim() != 2:
        raise ValueError(f"vq_dequantize: codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if indices.device != codebook.device:
        raise ValueError(
            f"vq_dequantize: indices and codebook must be on the same device, got {indices.device} and {codebook.device}"
        )
    # meta tensors hold no values to check (shape inference)
    if validate and indices.numel() > 0 and not torch.compiler.is_compiling() and not indices.is_meta:
        lo, hi = (int(v) for v in torch.aminmax(indices))
        K = codebook.shape[0]
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            hint = " (-1 marks a row of vq_lookup's input that held NaN or inf)" if bad == -1 else ""
            raise IndexError(f"vq_dequantize: code id {bad} is outside [0, {K}){hint}")
    return F.embedding(indices, codebook)
