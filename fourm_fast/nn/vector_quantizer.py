"""Vector quantiser on the vq_lookup op: what fourm_fast's VQ tokenizers use.

Training follows VQ-VAE (van den Oord et al. 2017) as 4M's tokenizers do: straight-through
estimator, codebook loss ``|sg(z) - e|^2`` and commitment loss ``beta |z - sg(e)|^2``; or, with
``ema_decay``, codebook updates by exponential moving averages of assignments (VQ-VAE-2) in place of
the codebook loss, with restarts of codes that fall out of use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.vq import NORM_EPS, vq_dequantize, vq_lookup


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class VQOutput:
    quantized: Tensor  # (..., D) straight-through: forward = code, backward = identity to z
    indices: Tensor  # (...) int64
    loss: Tensor  # () codebook_loss + beta * commitment_loss
    commitment_loss: Tensor  # ()
    codebook_loss: Tensor  # () zero when the codebook is trained by EMA
    perplexity: Tensor  # () exp(entropy of the batch's code usage)


class VectorQuantizer(nn.Module):
    """Quantise ``z (..., dim)`` to the nearest of ``num_codes`` codes.

    Args:
        num_codes: codebook size K.
        dim: code dimension D.
        metric: ``"l2"`` or ``"cosine"`` (then z and the codes are L2-normalised before the loss
            and the output, as 4M's cosine codebooks).
        beta: commitment-loss weight.
        ema_decay: if set (e.g. 0.99), update the codebook by EMA instead of the codebook loss.
        ema_eps: with EMA, the Laplace smoothing of the code counts (keeps a code that got no
            assignment from dividing by zero).
        dead_code_threshold: with EMA, codes whose running usage falls below this many
            assignments are restarted at random inputs of the current batch.
        check_finite: raise on inputs with NaN/inf (one host sync per call). False saves the sync and
            makes finite inputs a precondition: such a row's index is -1, which the code gather
            and the EMA update then fail on with an indexing error, not a clear message.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        metric: str = "l2",
        beta: float = 0.25,
        ema_decay: float | None = None,
        ema_eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
        check_finite: bool = True,
    ):
        super().__init__()
        if metric not in ("l2", "cosine"):
            raise ValueError(f'VectorQuantizer: metric must be "l2" or "cosine", got "{metric}"')
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer: num_codes and dim must be positive, got {num_codes}, {dim}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: ema_decay must be in (0, 1), got {ema_decay}")
        self.num_codes, self.dim, self.metric, self.beta = num_codes, dim, metric, beta
        self.ema_decay, self.ema_eps = ema_decay, ema_eps
        self.dead_code_threshold = dead_code_threshold
        self.check_finite = check_finite
        init = torch.randn(num_codes, dim) / dim**0.5
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", init.clone())

    def _normalise(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1, eps=NORM_EPS) if self.metric == "cosine" else t

    def forward(self, z: Tensor) -> VQOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: expected (..., {self.dim}), got {tuple(z.shape)}")
        codebook = self.codebook
        # vq_lookup's dtypes, named here (a .double() module or an integer z failed deep inside it)
        if codebook.dtype not in _DTYPES or not z.is_floating_point():
            raise TypeError(f"VectorQuantizer: the codebook must be float32, bfloat16 or float16 and z floating, "
                            f"got codebook {codebook.dtype} and z {z.dtype}")
        z_in = z.to(codebook.dtype) if z.dtype != codebook.dtype else z
        indices, _ = vq_lookup(z_in.detach(), codebook.detach(), self.metric)
        if self.check_finite and bool((indices < 0).any()):
            raise ValueError("VectorQuantizer: the input holds NaN or inf (vq_lookup returned -1)")
        codes = self._normalise(vq_dequantize(indices, codebook, validate=False)).to(z.dtype)
        zn = self._normalise(z)
        commitment = F.mse_loss(zn, codes.detach())
        if self.ema_decay is None:
            codebook_loss = F.mse_loss(codes, zn.detach())
        else:
            codebook_loss = torch.zeros((), device=z.device, dtype=commitment.dtype)
            if self.training:
                self._ema_update(zn.detach().reshape(-1, self.dim), indices.reshape(-1))
        quantized = zn + (codes - zn).detach()
        usage = torch.bincount(indices.reshape(-1), minlength=self.num_codes).float()
        probs = usage / usage.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return VQOutput(quantized, indices, codebook_loss + self.beta * commitment, commitment, codebook_loss, perplexity)

    @torch.no_grad()
    def _ema_update(self, z: Tensor, indices: Tensor) -> None:
        decay = self.ema_decay
        counts = torch.zeros_like(self.ema_count).index_add_(0, indices, torch.ones_like(indices, dtype=self.ema_count.dtype))
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, z.to(self.ema_sum.dtype))
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.ema_eps) / (n + self.num_codes * self.ema_eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(z)

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor) -> None:
        dead = self.ema_count < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0 or z.shape[0] == 0:
            return
        picks = torch.randint(0, z.shape[0], (num_dead,), device=z.device)
        fresh = z[picks].to(self.codebook.dtype)
        self.codebook[dead] = fresh
        self.ema_sum[dead] = fresh
        self.ema_count[dead] = 1.0
