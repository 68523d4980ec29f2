"""Token sampling for generation steps: CFG, top-k / top-p / min-p, temperature, Philox draws."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .masking import int64_counter

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
ParamLike = float | int | Tensor


def _param(value: ParamLike, name: str, R: int, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"sample_tokens: {name} must hold real numbers, got a {value.dtype} tensor")
        if value.dim() not in (0, 1) or (value.dim() == 1 and value.shape[0] != R):
            raise ValueError(f"sample_tokens: {name} must be a scalar or have one value per row ({R}), got shape {tuple(value.shape)}")
        return value.detach().to(device=device, dtype=torch.float32)  # a gradient is refused by the caller
    # numbers.Real takes numpy scalars too; bool is an int to Python but never a setting here
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"sample_tokens: {name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _counter(value: int | Tensor, name: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"sample_tokens: {name} must be an integer scalar or a 0-d integer tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.int64)
    return torch.full((), int64_counter(value, name, "sample_tokens"), dtype=torch.int64, device=device)


def sample_tokens(
    logits: Tensor,
    *,
    temperature: ParamLike = 1.0,
    top_k: ParamLike = 0,
    top_p: ParamLike = 1.0,
    min_p: ParamLike = 0.0,
    uncond_logits: Tensor | None = None,
    cfg_scale: ParamLike = 1.0,
    seed: int | Tensor = 0,
    offset: int | Tensor = 0,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row (4M's sampling step, fused).

    Args:
        logits: ``(R, V)`` float32 / bfloat16 / float16; finite or -inf (masked). ``g - max`` is
            formed in float32 before the temperature divides it, so a row whose finite logits
            span more than float32's range (~3.4e38) gives the low ones weight 0 at any
            temperature.
        temperature: ``>= 0``; 0 means argmax with probability 1.
        top_k: 0 (off), a count ``>= 1``, or a fraction of V in (0, 1) as in 4M, at least one token
            (a Python float fraction is resolved in double precision like 4M; a tensor fraction in float32).
        top_p: in (0, 1]; 1 is off. Keeps the highest tokens until their mass reaches p.
        min_p: in [0, 1]; keeps tokens with ``p >= min_p * p_max``; 0 is off.
        uncond_logits: ``(R, V)`` like logits; enables guidance ``u + cfg_scale (c - u)``.
        cfg_scale: guidance scale (1 = the conditional logits); another value, or a tensor, without
            uncond_logits raises (it was ignored).
        seed, offset: Philox key and stream offset (ints, or 0-d int tensors for CUDA graphs;
            one per call, never per row).

    temperature, top_k, top_p, min_p and cfg_scale may also be ``(R,)`` tensors of per-row values.

    Returns:
        tokens: ``(R,)`` int64.
        probs: ``(R,)`` float32, the drawn token's probability under the filtered, tempered
            distribution (MaskGIT's confidence); not differentiable (a backward through it raises).

    Top-k, then top-p (on the top-k survivors), then min-p filter the guided logits. Softmax
    weights are fixed-point integers, so sums are exact in any order; the draw is the inverse CDF
    over them at one Philox(seed, offset, row) uniform per row, so a seed gives the same tokens on
    the CPU and on CUDA (csrc/kernels/sampling_math.h). NaN logits, a +inf logit, rows without a
    finite logit and bad parameters raise ValueError.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"sample_tokens: logits must be a 2-D (R, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    R, dev = logits.shape[0], logits.device
    numeric = isinstance(cfg_scale, numbers.Real) and not isinstance(cfg_scale, bool)
    if uncond_logits is None and (isinstance(cfg_scale, Tensor) or (numeric and cfg_scale != 1.0)):
        raise ValueError(f"sample_tokens: cfg_scale {cfg_scale if not isinstance(cfg_scale, Tensor) else '(a tensor)'} "
                         "guides towards logits and away from uncond_logits, which were not given")
    if isinstance(top_k, numbers.Real) and not isinstance(top_k, numbers.Integral) and 0.0 < top_k < 1.0:
        # 4M's fraction rule in Python's double precision: 0.01 * 1000 is 10 here, while the same
        # fraction rounded to the op's float32 parameters would give 9. At least 1: a fraction of a
        # small vocabulary rounding to 0 turned filtering off (0 means "no top-k").
        top_k = max(min(int(top_k * logits.shape[1]), logits.shape[1]), 1)
    # No autograd kernel on the op (one would put a Python hop at the Autograd key on every call,
    # no_grad ones included: about 8 us): inputs that need a gradient go through _SampledProbs.
    # Parameter tensors count too: a learnable temperature left its gradient None without a word.
    needs_grad = [t for t in (logits, uncond_logits, temperature, top_k, top_p, min_p, cfg_scale)
                  if isinstance(t, Tensor) and t.requires_grad] if torch.is_grad_enabled() else []
    grad = bool(needs_grad)
    tokens, probs = torch.ops.fourm_fast.sample_tokens.default(
        logits.detach() if grad else logits,
        uncond_logits.detach() if grad and uncond_logits is not None else uncond_logits,
        _param(temperature, "temperature", R, dev),
        _param(top_k, "top_k", R, dev),
        _param(top_p, "top_p", R, dev),
        _param(min_p, "min_p", R, dev),
        _param(cfg_scale, "cfg_scale", R, dev),
        _counter(seed, "seed", dev),
        _counter(offset, "offset", dev),
    )
    return tokens, (_SampledProbs.apply(probs, *needs_grad) if grad else probs)


_NOT_DIFFERENTIABLE = ("sample_tokens is not differentiable: tokens are discrete draws and probs is the drawn "
                       "token's probability with no gradient formula; for a gradient of it, gather "
                       "log_softmax(logits / T) at the returned tokens")


@torch.library.custom_op("fourm_fast::sample_tokens_backward", mutates_args=())
def _sample_tokens_backward(grad: Tensor, like: Tensor) -> Tensor:
    """The backward of sample_tokens' probs, which raises when it runs. An op rather than a raise
    in _SampledProbs.backward: torch.compile (fullgraph too) traces a backward while compiling the
    forward, and a raise there failed the compile of a call that never ran a backward."""
    raise RuntimeError(_NOT_DIFFERENTIABLE)


@_sample_tokens_backward.register_fake
def _sample_tokens_backward_fake(grad, like):
    return torch.empty_like(like)


class _SampledProbs(torch.autograd.Function):
    """probs joined to the graph of the inputs that need a gradient (logits, or a parameter tensor),
    with a backward that raises: the op has no gradient, and without this a backward through probs
    warned and left their gradients None silently."""

    @staticmethod
    def forward(ctx, probs, *inputs):
        ctx.save_for_backward(*inputs)
        return probs.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None, *(torch.ops.fourm_fast.sample_tokens_backward(grad, x) for x in ctx.saved_tensors))


@torch.library.register_fake("fourm_fast::sample_tokens")
def _sample_tokens_fake(logits, uncond_logits, temperature, top_k, top_p, min_p, cfg_scale, seed, offset):
    torch._check_value(logits.dim() == 2, lambda: f"sample_tokens: logits must be 2-D (R, V), got {tuple(logits.shape)}")
    torch._check_value(logits.shape[1] >= 1, lambda: "sample_tokens: the vocabulary is empty (V = 0)")
    torch._check_type(logits.dtype in _SUPPORTED, lambda: f"sample_tokens: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if uncond_logits is not None:
        torch._check_value(uncond_logits.shape == logits.shape, lambda: "sample_tokens: uncond_logits must match logits' shape")
        torch._check_type(uncond_logits.dtype == logits.dtype, lambda: "sample_tokens: uncond_logits must have the logits' dtype")
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p), ("cfg_scale", cfg_scale)):
        torch._check_type(t.dtype == torch.float32, lambda: f"sample_tokens: {name} must be a float32 tensor")
    R = logits.shape[0]
    return logits.new_empty((R,), dtype=torch.int64), logits.new_empty((R,), dtype=torch.float32)


def select_positions(confidence: Tensor, candidates: Tensor, num_select: Tensor) -> Tensor:
    """Mask of the ``num_select[b]`` most confident candidates of each row (MaskGIT's step).

    Args:
        confidence: ``(B, N)`` float; NaN among candidates raises (eager mode).
        candidates: ``(B, N)`` bool, positions that may be chosen.
        num_select: ``(B,)`` integer counts ``>= 0``; a count above the row's number of
            candidates selects them all.

    Returns:
        ``(B, N)`` bool, True at the chosen positions; equal confidences go to the lower index.
    """
    if confidence.dim() != 2 or candidates.shape != confidence.shape:
        raise ValueError(f"select_positions: confidence and candidates must both be (B, N), got {tuple(confidence.shape)} and {tuple(candidates.shape)}")
    if candidates.dtype != torch.bool:
        raise TypeError(f"select_positions: candidates must be bool, got {candidates.dtype}")
    if not confidence.dtype.is_floating_point:
        raise TypeError(f"select_positions: confidence must be floating point, got {confidence.dtype}")
    num_select = torch.as_tensor(num_select, device=confidence.device)
    if num_select.dim() == 0:
        num_select = num_select.expand(confidence.shape[0])
    if num_select.shape != (confidence.shape[0],) or num_select.dtype.is_floating_point or num_select.dtype == torch.bool:
        raise ValueError(f"select_positions: num_select must be integer counts of shape ({confidence.shape[0]},), got {num_select.dtype} {tuple(num_select.shape)}")
    if not torch.compiler.is_compiling() and not confidence.is_meta:  # meta tensors hold no values
        if bool((num_select < 0).any()):
            raise ValueError("select_positions: num_select must be >= 0")
        if bool((torch.isnan(confidence) & candidates).any()):
            raise ValueError("select_positions: NaN confidence at a candidate position")
    B, N = confidence.shape
    # Candidates first, then by confidence descending; stable sorts keep the lower index first.
    # float64 stays float64 (rounding to float32 would tie confidences that differ); 16-bit widens exactly
    conf = confidence.to(torch.promote_types(confidence.dtype, torch.float32)).masked_fill(~candidates, 0.0)
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    cand_sorted = torch.gather(candidates, 1, order).to(torch.uint8)
    order = torch.gather(order, 1, torch.sort(cand_sorted, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    return (rank < num_select[:, None]) & candidates
