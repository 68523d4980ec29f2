"""``x @ weight.T`` for a few rows on the CPU, at the speed of streaming the weight.

One autoregressive decoding step multiplies a handful of rows by every weight matrix of the
decoder and by the output head: R multiply-adds per weight float, so the time is that of reading
the weight from memory. fourm_fast.nn.few_rows routes such products here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dtype_names import aten_name


def rows_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` without bias.

    Args:
        x: ``(R, K)`` float32, bfloat16 or float16 on the CPU, unit stride along K preferred
            (other layouts are copied).
        weight: ``(N, K)`` on the CPU, x's dtype (an ``nn.Linear`` weight).

    Returns:
        ``(R, N)`` in x's dtype. Each entry is one float32 dot product in a fixed order
        (csrc/kernels/rows_linear_math.h; 16-bit inputs are widened exactly), rounded once to the
        dtype, so results do not depend on the thread count and the AVX2 kernel returns the
        portable loop's bits (NaN stays NaN; its payload may differ). They agree with F.linear to
        the rounding of a float32 sum, not bitwise. 16-bit weights stream at half float32's bytes.
        Differentiable in both arguments. CPU only: on a GPU F.linear already runs few-row
        products at memory speed, and CUDA tensors raise.
    """
    return torch.ops.fourm_fast.rows_linear.default(x, weight)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(x: Tensor, weight: Tensor) -> None:
    # Mirrors csrc/rows_linear_checks.h so traced/compiled code raises the same errors as eager.
    torch._check_value(x.dim() == 2, lambda: f"rows_linear: x must be 2-D (R, K), got shape {tuple(x.shape)}")
    torch._check_value(weight.dim() == 2, lambda: f"rows_linear: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    torch._check_value(x.shape[1] == weight.shape[1],
                       lambda: f"rows_linear: x has K = {x.shape[1]} but weight has K = {weight.shape[1]}")
    torch._check_type(x.dtype in _DTYPES and weight.dtype == x.dtype,
                      lambda: "rows_linear: x and weight must both be float32, bfloat16 or float16, got x "
                              f"{aten_name(x.dtype)} and weight {aten_name(weight.dtype)}")
    torch._check_value(x.device == weight.device,
                       lambda: f"rows_linear: x and weight must be on the same device, got {x.device} and {weight.device}")


@torch.library.register_fake("fourm_fast::rows_linear")
def _rows_linear_fake(x: Tensor, weight: Tensor) -> Tensor:
    _check_inputs(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


torch.library.register_autograd("fourm_fast::rows_linear", _backward, setup_context=_setup_context)
