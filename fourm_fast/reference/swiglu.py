"""swiglu in plain PyTorch: the gate of 4M's SwiGLU MLP (ml-4m's gated Mlp with SiLU,
``act(fc1(x)) * fc3(x)``), as the model would run it eagerly and in float64 for the tests."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def swiglu_eager(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``: what 4M runs (two elementwise passes forward, three backward)."""
    return F.silu(gate) * up


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The op's semantics in float64 (differentiable: its autograd gives the reference gradients)."""
    return F.silu(gate.double()) * up.double()
