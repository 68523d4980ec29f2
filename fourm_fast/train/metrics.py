"""Progress line, metrics.csv, TensorBoard, and the analytic FLOP count behind MFU."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch

from ..model import FourMConfig

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU on GPUs; CPUs get a measured sgemm rate instead.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def flops_per_step(cfg: FourMConfig, batch: int, n_enc: int, n_dec: int, vocab_tokens: float) -> float:
    """Training FLOPs of one step (forward + backward = 3x forward), counting matmuls only:
    projections and MLPs 2 * params per token, attention 4 * N * dim per token per layer (scores and
    weighted sum), cross-attention over the encoder tokens, the output heads on the targets.
    vocab_tokens: sum over target tokens of their vocabulary size (the heads' work)."""
    d, h = cfg.dim, cfg.mlp_hidden
    mlp = (3 if cfg.gated_mlp else 2) * d * h
    enc_layer = 4 * d * d + mlp
    dec_layer = 4 * d * d + 2 * d * d + mlp  # self (qkv + proj), cross q + proj: per decoder token
    cross_kv = 2 * d * d  # the cross-attention's keys and values: per encoder (context) token
    fwd = 2 * batch * (n_enc * enc_layer * cfg.encoder_depth + (n_dec * dec_layer + n_enc * cross_kv) * cfg.decoder_depth
                       + n_enc * d * d)
    fwd += 4 * batch * d * (n_enc * n_enc * cfg.encoder_depth + (n_dec * n_dec + n_dec * n_enc) * cfg.decoder_depth)
    fwd += 2 * d * vocab_tokens
    return 3.0 * fwd


def measured_cpu_tflops(dtype: torch.dtype = torch.float32) -> float:
    """What this machine's CPU sustains on a 1024^3 matmul in dtype (the MFU denominator on CPU;
    bfloat16 for bf16 autocast, which runs AMX / AVX-512-BF16 GEMMs where the CPU has them).

    The best of five timed pairs: a peak is the fastest rate the CPU reaches, and on a shared VM a
    single timing caught a slow moment (a bench_train run reported 119% MFU against it)."""
    g = torch.Generator().manual_seed(0)  # not the global generator: a resumed run restored it
    a = torch.randn(1024, 1024, generator=g).to(dtype)
    b = torch.randn(1024, 1024, generator=g).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(2):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2 * 1024**3 / best / 1e12


def peak_tflops(device: torch.device, override: float | None, bf16: bool = False) -> tuple[float, str]:
    """MFU denominator: the override, a GPU's bf16 datasheet peak, or on the CPU a measured matmul
    rate (float32, or bfloat16 when the step runs under bf16 autocast)."""
    if override:
        return float(override), "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name} bf16 dense peak"
        return 0.0, f"unknown peak for {name}"
    if bf16:
        return measured_cpu_tflops(torch.bfloat16), "measured CPU bf16 matmul"
    return measured_cpu_tflops(), "measured CPU sgemm"


class MetricsLog:
    """metrics.csv (one row per logged step) and, when available, TensorBoard scalars."""

    FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"]

    def __init__(self, out: Path, modalities: list[str], tensorboard: bool, resume: bool, resume_step: int = 0):
        """resume: keep the rows of steps up to resume_step (the checkpoint's), drop later ones: a run
        that died after its last checkpoint logged steps that the resumed run logs again."""
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.csv"
        self.fields = self.FIELDS + [f"loss_{m}" for m in modalities]
        kept = []
        if resume and self.path.exists():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        self._file = self.path.open("w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")
        self._csv.writeheader()
        for r in kept:
            self._csv.writerow(r)
        self._file.flush()
        self._tb = None
        self.tb_note = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # on resume, events of steps after the checkpoint (logged by the run that died) go
                self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume else None)
            except ImportError:
                self.tb_note = "TensorBoard logging off: the tensorboard package is not installed"

    def write(self, row: dict) -> None:
        self._csv.writerow({k: row.get(k, "") for k in self.fields})
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """One status line: a bar on a terminal (rewritten in place), plain lines otherwise."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False  # a bar is on the terminal's current line

    def finish(self) -> None:
        """Ends a bar left mid-line, so a message after it starts on a line of its own."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
        if not self.enabled:
            return
        frac = step / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        mfu_s = f" mfu {100 * mfu:5.1f}%" if mfu is not None else ""
        line = f"[{bar}] step {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s{mfu_s}"
        if self.tty:
            self.stream.write("\r" + line + (" " * 4))
            self._open = step != self.total
            if not self._open:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
