"""Run under torchrun by tests/test_train.py: train where only rank 1's loss turns NaN at step 3,
while every gradient stays finite (so the gradient all-reduce carries no NaN to rank 0). Both
ranks must stop after the same step with the divergence error; a rank that trained on alone would
wait forever in its next collective."""
import os
import sys
from pathlib import Path

import torch

from fourm_fast.model import FourM
from fourm_fast.train.config import load_config
from fourm_fast.train.trainer import TrainingDiverged, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_training import SMALL_RUN  # noqa: E402


class NanValue(torch.autograd.Function):
    """NaN forward, the incoming gradient passed through unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x * float("nan")

    @staticmethod
    def backward(ctx, g):
        return g


out, strategy = sys.argv[1], sys.argv[2]
rank, calls, forward = int(os.environ["RANK"]), [0], FourM.forward


def forward_with_nan(self, *args, **kwargs):
    loss, per_mod = forward(self, *args, **kwargs)
    calls[0] += 1
    return (NanValue.apply(loss) if rank == 1 and calls[0] == 3 else loss), per_mod


FourM.forward = forward_with_nan
try:
    train(load_config(None, SMALL_RUN + ["train.steps=8", f"out={out}", f"distributed.strategy={strategy}"]),
          log=lambda m: None)
except TrainingDiverged as e:
    Path(out, f"error-rank{rank}.txt").write_text(str(e))
    os._exit(3)
os._exit(0)
