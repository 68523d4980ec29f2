#!/usr/bin/env python
"""Shard loading: the DALI pipeline against the PIL + torch DataLoader path, same work on the same cores.

Both decode every image modality of the synthetic shards (rgb, depth 16-bit, normal, semseg, edges:
PNG), crop the same random window and flip the same samples (EpochPlan: the batches are bit-equal),
and yield the same dict of tensors; DALI gets --workers CPU threads, the DataLoader --workers
persistent worker processes. One timed run is one epoch over --n samples, after a warm-up epoch
(page cache, pipeline build, worker start); median of --repeats epochs.

Also timed: the construction-time validation pass (SHA-256 of every file against the manifest plus
the PNG headers) against the headers-only pass of verify=False, reported next to one DALI epoch.
Everything runs from a warm page cache (the shards were just written or read): these are CPU costs,
not storage reads.

  python bench/bench_data.py                      # 64 px and 224 px, 256 samples, batch 32, 2 workers
  python bench/bench_data.py --sizes 64 --n 128 --no-save
  python bench/bench_data.py --device cuda        # DALI decodes with device="mixed"; the torch path copies to the GPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.utils import append_results, environment, fraction, positive_int, positive_int_list, set_threads, time_cpu, timing_dict  # noqa: E402
from fourm_fast.data import build_loader, read_manifest, write_synthetic  # noqa: E402
from fourm_fast.data.validate import IMAGE_SPECS, scan_images  # noqa: E402


def consume(loader, device: str) -> int:
    """One epoch; the torch path's images go to the GPU when DALI's do, so both end in the same place."""
    count = 0
    for batch in loader:
        if device == "cuda":
            images = {m: t.to("cuda", non_blocking=True) for m, t in batch["images"].items()}
            torch.cuda.synchronize()
        else:
            images = batch["images"]
        count += len(batch["index"])
        assert images
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=positive_int_list, default=[64, 224], help="image sides of the synthetic shards, e.g. 64,224")
    ap.add_argument("--n", type=positive_int, default=256, help="samples per shard folder (one epoch)")
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--workers", type=positive_int, default=2, help="DALI threads = DataLoader worker processes")
    ap.add_argument("--crop", type=fraction(low_open=True), default=0.875, help="crop side as a fraction of the image side")
    ap.add_argument("--flip", type=fraction(low_open=False), default=0.5, help="flip probability")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed epochs per method")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads in this process")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--data", default=None, help="keep the shards here (default: a temporary folder)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.n < args.batch:
        ap.error(f"--n {args.n} < --batch {args.batch}: an epoch would hold no batch")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")

    set_threads(args.threads)
    env = environment(args.device)
    sizes = args.sizes
    device_id = 0 if args.device == "cuda" else None
    print(f"# shard loading on {env['device_name']}, {args.workers} DALI threads vs {args.workers} DataLoader "
          f"workers, batch {args.batch}, {args.n} samples/epoch, sha {env['git_sha']}")
    print(f"{'size':>5} {'crop':>5}  {'method':<24} {'median ms':>10} {'p20-p80 ms':>19} {'samples/s':>10} {'vs torch':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.data or tmp)
        for size in sizes:
            root = base / f"synth{size}_n{args.n}"
            if not (root / "manifest.json").exists() or read_manifest(root)["num_samples"] != args.n:
                t0 = time.perf_counter()
                write_synthetic(root, args.n, size=size, seed=0, progress=False)
                print(f"# wrote {args.n} scenes at {size} px in {time.perf_counter() - t0:.1f} s to {root}", flush=True)
            crop = max(1, round(size * args.crop))
            common = dict(images=list(IMAGE_SPECS), tokens=[], crop=crop, flip_prob=args.flip, seed=0,
                          num_workers=args.workers)
            loaders = {"dali": build_loader(root, args.batch, backend="dali", device_id=device_id, **common),
                       "pil+torch_dataloader": build_loader(root, args.batch, backend="torch", **common)}
            samples = len(loaders["dali"]) * args.batch
            timings = {}
            for name, loader in loaders.items():
                timings[name] = t = time_cpu(lambda: consume(loader, args.device), repeats=args.repeats, warmup=1)
            ref = timings["pil+torch_dataloader"].median_ms
            for name, t in timings.items():
                rate = samples / (t.median_ms * 1e-3)
                rows.append({"op": "shard_loader", "method": name, "size": size, "crop": crop, "flip_prob": args.flip,
                             "batch": args.batch, "workers": args.workers, "samples": samples,
                             "modalities": list(IMAGE_SPECS), **timing_dict(t), "samples_per_s": round(rate, 1),
                             "speedup_vs_torch": round(ref / t.median_ms, 3)})
                print(f"{size:>5} {crop:>5}  {name:<24} {t.median_ms:>10.1f} {t.p20_ms:>9.1f}-{t.p80_ms:<9.1f} "
                      f"{rate:>10.0f} {ref / t.median_ms:>8.2f}x", flush=True)
            manifest = read_manifest(root)
            epoch_ms = timings["dali"].median_ms
            for verify in (True, False):
                t = time_cpu(lambda: scan_images(root, manifest, list(IMAGE_SPECS), verify=verify), repeats=args.repeats)
                name = "scan_sha256+headers" if verify else "scan_headers_only"
                rows.append({"op": "shard_scan", "method": name, "size": size, "samples": args.n, **timing_dict(t),
                             "ms_per_sample": round(t.median_ms / args.n, 4),
                             "fraction_of_dali_epoch": round(t.median_ms / epoch_ms * samples / args.n, 4)})
                print(f"{size:>5} {'':>5}  {name:<24} {t.median_ms:>10.1f} {t.p20_ms:>9.1f}-{t.p80_ms:<9.1f} "
                      f"{'':>10} {'':>9}  ({100 * t.median_ms / epoch_ms * samples / args.n:.1f}% of a DALI epoch)",
                      flush=True)
            del loaders
    if not args.no_save:
        print(f"# appended {len(rows)} rows to {append_results('data', rows, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
