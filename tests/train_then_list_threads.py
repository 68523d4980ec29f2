"""Run under torchrun by tests/test_train.py: train a few steps, then write this process's thread
names (Linux /proc) to threads-rank<R>.txt in the out folder. One file per rank: the ranks' prints
to one shared stdout pipe interleaved within a line once. Threads still alive after train() returns
are joined at interpreter exit, where a gloo worker that needs the GIL aborts the process."""
import os
import sys
from pathlib import Path

from fourm_fast.train.config import load_config
from fourm_fast.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_training import SMALL_RUN  # noqa: E402

out, strategy = sys.argv[1], sys.argv[2]
train(load_config(None, SMALL_RUN + ["train.steps=2", f"out={out}", f"distributed.strategy={strategy}"]),
      log=lambda m: None)
names = []
for t in os.listdir("/proc/self/task"):
    try:
        names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
    except FileNotFoundError:  # the thread ended after the listing
        pass
names.sort()
Path(out, f"threads-rank{os.environ['RANK']}.txt").write_text(",".join(names))
