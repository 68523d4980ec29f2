"""The token-budget sampler's native ops: budgets, the gather layout, span masking.

These are the building blocks; ``fourm_fast.masking.TokenBudgetSampler`` is the user-facing API.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

KEEP_MODES = {"random": 0, "all": 1, "binary": 2}
SPAN_PAD = -(2**31)  # source code of a padding slot in span_mask's output (sentinel s is -s)
MIN_POSITIVE_ALPHA = 1e-30  # smallest Dirichlet alpha above 0 (kMinPositiveAlpha in csrc/kernels/masking_math.h)


class Layout(NamedTuple):
    """Per sample: encoder slots (inputs) and decoder slots (targets), ready to gather.

    ``*_index`` index the concatenated per-sample token buffer (see TokenLayout.offsets);
    ``*_position`` is the position inside the modality; decoder self-attention metadata for
    ``masked_attention``: ``q_segment = k_segment = dec_segment``, ``k_rank = dec_rank``,
    ``q_limit = dec_limit``, ``k_valid = dec_valid``.
    """

    enc_index: Tensor
    enc_modality: Tensor
    enc_position: Tensor
    enc_valid: Tensor
    dec_index: Tensor
    dec_modality: Tensor
    dec_position: Tensor
    dec_valid: Tensor
    dec_segment: Tensor
    dec_rank: Tensor
    dec_limit: Tensor


def int64_counter(value, name: str, op: str) -> int:
    """A seed or offset: any 64-bit integer (>= 2**63 wraps to the same 64 bits as int64, which is
    what the schemas hold); others get a TypeError here instead of the dispatcher's schema error.
    Shared by the masking ops and sample_tokens."""
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{op}: {name} must fit in 64 bits")
    return value - 2**64 if value >= 2**63 else value


def sample_budgets(
    batch_size: int,
    alpha_in: Tensor,
    alpha_tg: Tensor,
    weights: Tensor | None,
    size: Tensor,
    is_image: Tensor,
    input_range: tuple[int, int],
    target_range: tuple[int, int],
    seed: int,
    offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: mixture component, input and target budgets ``[B, M]`` (int32), as 4M draws them."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"sample_budgets: batch_size must be an int, got {type(batch_size).__name__}")
    batch_size = int(batch_size)
    seed, offset = int64_counter(seed, "seed", "sample_budgets"), int64_counter(offset, "offset", "sample_budgets")
    return torch.ops.fourm_fast.sample_budgets.default(
        batch_size, alpha_in, alpha_tg, weights, size, is_image,
        input_range[0], input_range[1], target_range[0], target_range[1], seed, offset,
    )


def token_layout(
    input_budget: Tensor,
    target_budget: Tensor,
    seq_input: Tensor,
    seq_target: Tensor,
    size: Tensor,
    is_image: Tensor,
    num_encoder: int,
    num_decoder: int,
    seed: int,
    offset: int = 0,
) -> Layout:
    """Choose image tokens (uniform, disjoint) and lay out encoder / decoder slots per sample."""
    seed, offset = int64_counter(seed, "seed", "token_layout"), int64_counter(offset, "offset", "token_layout")
    return Layout(*torch.ops.fourm_fast.token_layout.default(
        input_budget, target_budget, seq_input, seq_target, size, is_image, num_encoder, num_decoder, seed, offset,
    ))


def span_mask(
    lengths: Tensor,
    input_budget: Tensor,
    target_budget: Tensor,
    keep_mode: Tensor,
    max_tokens: int,
    modality: int,
    seed: int,
    offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """4M's span masking of one sequence modality for a batch (CPU).

    Returns ``source [B, 2 (max_tokens + 1)]`` (token index j >= 0, sentinel s as -s, SPAN_PAD),
    the input and target lengths, and the highest sentinel number each sample used.
    """
    seed, offset = int64_counter(seed, "seed", "span_mask"), int64_counter(offset, "offset", "span_mask")
    return torch.ops.fourm_fast.span_mask.default(
        lengths, input_budget, target_budget, keep_mode, max_tokens, modality, seed, offset,
    )


def _check_config(op: str, name: str, t: Tensor, dtype: torch.dtype, dim: int) -> None:
    """csrc/masking_checks.h's check_config_tensor, for tracing: a graph that could not run fails
    when it is traced (the fakes' outputs otherwise took the wrong dtype from a wrong input)."""
    torch._check_type(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")
    torch._check_value(t.dim() == dim, lambda: f"{op}: {name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


@torch.library.register_fake("fourm_fast::sample_budgets")
def _sample_budgets_fake(batch_size, alpha_in, alpha_tg, weights, size, is_image, in_lo, in_hi, tg_lo, tg_hi, seed, offset):
    op = "sample_budgets"
    _check_config(op, "size", size, torch.int32, 1)
    _check_config(op, "is_image", is_image, torch.bool, 1)
    _check_config(op, "alpha_in", alpha_in, torch.float32, 2)
    _check_config(op, "alpha_tg", alpha_tg, torch.float32, 2)
    if weights is not None:
        _check_config(op, "weights", weights, torch.float32, 1)
    M = size.shape[0]
    opts = dict(dtype=torch.int32, device=size.device)
    return size.new_empty((batch_size,), **opts), size.new_empty((batch_size, M), **opts), size.new_empty((batch_size, M), **opts)


@torch.library.register_fake("fourm_fast::token_layout")
def _token_layout_fake(input_budget, target_budget, seq_input, seq_target, size, is_image, num_encoder, num_decoder, seed, offset):
    for name, t in (("input_budget", input_budget), ("target_budget", target_budget), ("seq_input", seq_input),
                    ("seq_target", seq_target)):
        _check_config("token_layout", name, t, torch.int32, 2)
    _check_config("token_layout", "size", size, torch.int32, 1)
    _check_config("token_layout", "is_image", is_image, torch.bool, 1)
    B = input_budget.shape[0]

    def make(n, dtype):
        return input_budget.new_empty((B, n), dtype=dtype)

    i32, i64, b8 = torch.int32, torch.int64, torch.bool
    return (make(num_encoder, i64), make(num_encoder, i32), make(num_encoder, i32), make(num_encoder, b8),
            make(num_decoder, i64), make(num_decoder, i32), make(num_decoder, i32), make(num_decoder, b8),
            make(num_decoder, i32), make(num_decoder, i32), make(num_decoder, i32))


@torch.library.register_fake("fourm_fast::span_mask")
def _span_mask_fake(lengths, input_budget, target_budget, keep_mode, max_tokens, modality, seed, offset):
    for name, t in (("lengths", lengths), ("input_budget", input_budget), ("target_budget", target_budget),
                    ("keep_mode", keep_mode)):
        _check_config("span_mask", name, t, torch.int32, 1)
    B = lengths.shape[0]
    i32 = dict(dtype=torch.int32)
    return (lengths.new_empty((B, 2 * (max_tokens + 1)), **i32), lengths.new_empty((B,), **i32),
            lengths.new_empty((B,), **i32), lengths.new_empty((B,), **i32))
