"""``silu(gate) * up`` in one pass each way: the gate of 4M's SwiGLU MLP.

fourm_fast.model's Mlp (``fc2(silu(fc1 x) * fc3 x)``) runs it. Eagerly the product is two
elementwise passes forward and three backward, and autograd keeps ``silu(gate)`` for the
product's backward; the op reads its inputs once per pass and saves only gate and up.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dtype_names import aten_name

SWIGLU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``, elementwise.

    Args:
        gate: any shape, float32, bfloat16 or float16, on the CPU or a GPU (``fc1 x`` in 4M's MLP).
        up: gate's shape, dtype and device (``fc3 x``). Any strides (non-contiguous inputs are
            copied first).

    Returns:
        gate's shape and dtype, contiguous. Each element is computed in float32 from IEEE-exact
        operations (csrc/kernels/swiglu_math.h) and rounded once to the dtype, so CPU and CUDA
        return the same bits (a NaN stays NaN; its payload may differ). float32 results are
        within a few ulp of the float64 value; 16-bit ones are the float32 result rounded once
        (eager ``F.silu(gate) * up`` rounds twice). ``silu(-inf)`` is NaN, as PyTorch's.
        Differentiable in both inputs, twice (the first backward is one fused pass,
        ``swiglu_backward``; its own gradient is plain PyTorch). Forward-mode AD (``torch.func.jvp``,
        ``forward_ad``) is not supported, as for every fourm_fast op: PyTorch gives custom ops a
        zero tangent.
    """
    return torch.ops.fourm_fast.swiglu.default(gate, up)


def _check_tensors(op: str, named: list[tuple[str, Tensor]]) -> None:
    # Mirrors csrc/swiglu_checks.h so traced/compiled code raises the same errors as eager.
    name0, t0 = named[0]
    torch._check_type(t0.dtype in SWIGLU_DTYPES,
                      lambda: f"{op}: {name0} must be float32, bfloat16 or float16, got {aten_name(t0.dtype)}")
    for name, t in named:
        torch._check_type(t.dtype == t0.dtype, lambda: f"{op}: {name} must have {name0}'s dtype "
                                                       f"{aten_name(t0.dtype)}, got {aten_name(t.dtype)}")
        torch._check_value(t.device == t0.device, lambda: f"{op}: {name} is on {t.device} but {name0} is on {t0.device}")
        torch._check_value(t.shape == t0.shape, lambda: f"{op}: {name} has shape {list(t.shape)} but {name0} has "
                                                        f"shape {list(t0.shape)}")


@torch.library.register_fake("fourm_fast::swiglu")
def _swiglu_fake(gate: Tensor, up: Tensor) -> Tensor:
    _check_tensors("swiglu", [("gate", gate), ("up", up)])
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("fourm_fast::swiglu_backward")
def _swiglu_backward_fake(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _check_tensors("swiglu_backward", [("grad", grad), ("gate", gate), ("up", up)])
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = torch.ops.fourm_fast.swiglu_backward.default(grad, gate, up)
    return (grad_gate if ctx.needs_input_grad[0] else None), (grad_up if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("fourm_fast::swiglu", _backward, setup_context=_setup_context)


def _double_backward(ctx, gg_gate, gg_up):
    """Gradient of (grad_gate, grad_up) = (g b silu'(a), g silu(a)) in plain PyTorch (float32 for
    16-bit inputs), so create_graph backward (second-order terms) is exact rather than dropped:
    silu''(a) = s (1 - s) (2 + a (1 - 2 s))."""
    g, a, b = ctx.saved_tensors
    dtype = a.dtype
    g, a, b = g.float(), a.float(), b.float()
    gg_gate = torch.zeros_like(a) if gg_gate is None else gg_gate.float()
    gg_up = torch.zeros_like(a) if gg_up is None else gg_up.float()
    s = torch.sigmoid(a)
    silu = a * s
    d1 = s * (1 + a * (1 - s))
    d2 = s * (1 - s) * (2 + a * (1 - 2 * s))
    d_g = gg_gate * b * d1 + gg_up * silu
    d_a = g * (gg_gate * b * d2 + gg_up * d1)
    d_b = gg_gate * g * d1
    need = ctx.needs_input_grad
    return tuple(t.to(dtype) if n else None for t, n in zip((d_g, d_a, d_b), need))


torch.library.register_autograd("fourm_fast::swiglu_backward", _double_backward,
                                setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))
