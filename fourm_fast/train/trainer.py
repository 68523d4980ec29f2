"""The training loop: AdamW + cosine schedule with warmup, gradient clipping and accumulation, bf16
autocast on GPU, optional torch.compile, DDP or FSDP2 under torchrun, exact resume.

Every process builds the same global batch and trains on its slice; each slice's loss is
normalised by the global batch's per-modality target counts (known on the host, no sync), so the
gradients the processes average are exactly the gradient of the global batch's loss: N processes
and one process with the same global batch take the same steps, up to float summation order.
A NaN or inf loss or gradient norm stops the run (TrainingDiverged) before it saves anything more.
"""
from __future__ import annotations

import gc
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import FourM, ModalityConfig, preset
from .checkpoint import (CheckpointError, checkpoint_dirs, latest_checkpoint, load_checkpoint, recover_leftovers,
                         save_checkpoint)
from .config import ConfigError, resume_mismatches
from .metrics import MetricsLog, Progress, flops_per_step, peak_tflops
from .synthetic import SyntheticSource, slice_batch


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite: the run stops without a checkpoint."""


_NEVER = torch.iinfo(torch.int64).max  # "no non-finite step seen" in the divergence tracker


def _note_nonfinite(first_bad: torch.Tensor, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """first_bad lowered to ``step`` when this step's loss or gradient norm is NaN or inf: device
    ops only, so the step does not wait for the GPU; the value is read where the loop syncs anyway."""
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))
    return torch.where(finite, first_bad, first_bad.clamp(max=step))


def _first_nonfinite_step(first_bad: torch.Tensor, d: "_Distributed") -> int | None:
    """The first step any process saw a non-finite loss or gradient norm (one all-reduce: every
    process reaches this at the same step and decides alike, so none is left in a collective)."""
    t = first_bad.clone()
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    n = int(t.item())
    return None if n == _NEVER else n


def build_model_config(cfg: dict):
    if cfg["modalities"] == "auto":
        from .shards_source import modalities_from_shards
        mods = tuple(modalities_from_shards(cfg["data"]["path"], cfg["data"]["max_text_tokens"]))
    else:
        try:
            mods = tuple(ModalityConfig(**m) for m in cfg["modalities"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"modalities: {e}") from None
    try:
        model_cfg = preset(cfg["model"]["preset"], mods, **cfg["model"].get("overrides", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    if not model_cfg.decoder_sep_mask or model_cfg.decoder_causal_mask:
        # the sampler's layout carries 4M's default decoder mask; other settings would be ignored
        raise ConfigError("training uses 4M's default decoder mask (decoder_sep_mask true, decoder_causal_mask "
                          f"false); got decoder_sep_mask={model_cfg.decoder_sep_mask}, "
                          f"decoder_causal_mask={model_cfg.decoder_causal_mask}")
    return model_cfg


def cosine_factor(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """LR multiplier. Warmup: step s < warmup trains at lr (s + 1) / warmup (never at 0). Then 4M's
    cosine_scheduler: step warmup + i trains at min_lr + (lr - min_lr) (1 + cos(pi i / n)) / 2 with
    n = total - warmup, so the last step is above min_lr (just above in a long run) and steps past
    the end at it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))) / lr


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = name.endswith(("mod_emb", "mask_token", "register_tokens")) or p.dim() < 2
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Distributed:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1
        self.cpu_group = None  # gloo group for host-side agreement (the stop flag) without a GPU sync
        self.owns_group = False  # train() created the process group (a caller's group is left alone)

    def init(self, device_kind: str):
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
            self.owns_group = True
        if self.active:
            self.cpu_group = dist.new_group(backend="gloo") if device_kind == "cuda" else dist.group.WORLD

    def close(self):
        """Tear the process groups down here, not at interpreter exit. Left to exit, gloo's worker
        threads are joined during finalization; one that then needs the GIL (to free a tensor Python
        handed to a collective) is killed inside a destructor, and the process aborts ("terminate
        called without an active exception") after a successful run. The caller drops the model
        wrapper first: DDP's reducer holds the group, from a reference cycle that only gc frees.
        Under FSDP2, torch's DTensor state keeps the group alive past this point (its threads then
        still end at exit), which this cannot reach. An exception in train() skips this (a barrier
        there could wait on a process that is gone)."""
        if self.active and self.owns_group and dist.is_initialized():
            dist.barrier(group=self.cpu_group)  # every process is past its last collective and checkpoint
            self.cpu_group = None
            dist.destroy_process_group()
            gc.collect()


class _StopFlag:
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, exit cleanly.

    The handler only records the signal; ``poll`` turns it into the decision ``signal`` once per
    step. Under torchrun a signal may reach one process and not the others (or reach them in
    different steps); all of them must then stop after the same step, or the next collective
    (gradient all-reduce, FSDP2's checkpoint gather) would hang. ``poll`` takes the maximum signal
    number over the processes on a CPU (gloo) group: one small host-side all-reduce per step.
    """

    def __init__(self):
        self.signal = None  # the decision: a signal name (or "stop_after=N"); None while training on
        self._pending = 0  # signal number received and not yet polled
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self._pending = signum

    def poll(self, d: "_Distributed") -> None:
        n = self._pending  # a snapshot: a signal arriving after it waits for the next step's poll
        if d.active:
            flag = torch.tensor([n], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.cpu_group)
            n = int(flag.item())
        if n and self.signal is None:
            self.signal = signal.Signals(n).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _wrap(model, strategy: str, device: torch.device, world: int):
    if world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for blk in (*model.encoder, *model.decoder):
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(cfg: dict, resume: bool | str = False, log=print) -> dict:
    """resume: True continues from the latest checkpoint in cfg["out"] (raising when there is none),
    False starts fresh (raising when the folder holds checkpoints), "auto" does whichever applies.

    Seeds the process's global torch and Python `random` generators from train.seed (a resume then
    sets them to the checkpoint's) and leaves them where the run ended: a caller's own state in
    them is not restored. NumPy's global generator is neither seeded nor checkpointed. Every
    process of a torchrun run gets the same seed."""
    d = _Distributed()
    tc = cfg["train"]
    want = tc["device"]
    device_kind = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if device_kind == "cuda" and not torch.cuda.is_available():  # a traceback from set_device before
        raise ConfigError("train.device=cuda, but no CUDA device is available (torch.cuda.is_available() is False)")
    d.init(device_kind)
    device = torch.device(device_kind, d.local_rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    writer = d.rank == 0
    B, accum = tc["batch_size"], tc["grad_accum"]
    if B % (d.world * accum):
        raise ConfigError(f"train.batch_size {B} must be divisible by processes x grad_accum = {d.world * accum}")
    per_rank, micro = B // d.world, B // (d.world * accum)

    # Both global generators a checkpoint restores start from the seed: a step that draws from
    # Python's (an augmentation) repeats from run to run, not only across a resume.
    torch.manual_seed(tc["seed"])
    random.seed(tc["seed"])
    model_cfg = build_model_config(cfg)
    inner = FourM(model_cfg).to(device)
    model = _wrap(inner, cfg["distributed"]["strategy"], device, d.world)
    if tc["compile"]:
        mode = "default" if tc["compile"] is True else tc["compile"]
        inner.forward_hidden = torch.compile(inner.forward_hidden, mode=mode)
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(_param_groups(inner, tc["weight_decay"]), lr=tc["lr"], betas=tuple(tc["betas"]),
                                  fused=fused)
    total = tc["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_factor(s, total, tc["warmup_steps"], tc["lr"], tc["min_lr"]))
    if cfg["data"]["source"] == "shards":
        from .shards_source import ShardSource
        source = ShardSource(model_cfg, cfg["data"], tc["seed"], log=log if writer else (lambda line: None))
    else:
        source = SyntheticSource(model_cfg, cfg["data"], tc["seed"])
    out = Path(cfg["out"])
    ckpt_root = out / "checkpoints"
    model_cfg_dict = model_cfg.to_dict()

    start = 0
    auto = resume == "auto"
    if writer:  # what killed writers left: half-written folders go, a moved-aside checkpoint comes back
        recover_leftovers(ckpt_root)
    if d.active:
        dist.barrier(group=d.cpu_group)  # every process then sees the same checkpoint folder
    if resume == "auto":
        resume = latest_checkpoint(ckpt_root) is not None
        if d.active:  # one decision for all (a node-local --out would otherwise split them)
            flag = torch.tensor([int(resume)], dtype=torch.int64)
            dist.broadcast(flag, src=0, group=d.cpu_group)
            resume = bool(flag.item())
    # A fresh run would mix its checkpoints with the old run's: keep-last-k would delete the new ones
    # (lower steps) first, and --resume or generate would load the old run's. Process 0 decides.
    found = [p.name for p in checkpoint_dirs(ckpt_root)] if not resume else []
    refuse = bool(found)
    if d.active:
        flag = torch.tensor([int(refuse)], dtype=torch.int64)
        dist.broadcast(flag, src=0, group=d.cpu_group)
        refuse = bool(flag.item())
    if refuse:
        raise CheckpointError(f"{ckpt_root} already holds checkpoints of an earlier run"
                              f"{' (' + ', '.join(found[-3:]) + ')' if found else ''}; continue it with --resume "
                              f"(or --auto-resume), or start this run in another --out (or delete them)")
    if resume:
        path = latest_checkpoint(ckpt_root)
        if path is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {ckpt_root}")
        state = load_checkpoint(path, model, inner, optimizer, scheduler, model_cfg_dict)
        changed = resume_mismatches(state["config"], cfg) if isinstance(state.get("config"), dict) else []
        if changed:
            raise CheckpointError(f"--resume: {path / 'state.pt'} was written with other settings, which the "
                                  f"resumed run would not honour exactly: {'; '.join(changed)}")
        start = state["step"]
        # The rate at the resume point under this run's schedule: with --steps changed, the rate
        # stored in the checkpoint is the old schedule's, and the first resumed step trained at it.
        # (Unchanged steps give the very value stored: the same lambda at the same step.)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        if writer:
            log(f"resumed from {path} at step {start}")
    if auto and start == total:  # a restarted or requeued job whose run had finished: nothing to do
        if writer:
            log(f"--auto-resume: the checkpoint is at step {start}, the run's last: it is complete, nothing to train")
        del model
        d.close()
        return {"steps": start, "out": str(out), "last": {}, "stopped_by": None, "rank": d.rank}
    if start >= total:
        raise CheckpointError(f"{'--auto-resume' if auto else '--resume'}: the checkpoint is at step {start}, "
                              f"the run has {total} steps; raise --steps")
    # Training runs to stop_after (checkpointed there), else to the end. A restart past stop_after
    # (an unchanged --stop-after under --auto-resume) trains nothing: it used to add a step per restart.
    end = total if tc["stop_after"] is None else min(total, max(tc["stop_after"], start))

    precision = tc["precision"]
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    peak, peak_note = peak_tflops(device, cfg["log"].get("peak_tflops"), bf16=use_bf16)
    metrics = MetricsLog(out, list(inner.decoder_embeddings), cfg["log"]["tensorboard"], resume, start) if writer else None
    if writer and metrics.tb_note:
        log(metrics.tb_note)
    progress = Progress(total, writer and cfg["log"]["progress"])
    n_enc, n_dec = source.num_encoder, source.num_decoder
    vocab = {i: m.vocab_size for i, m in enumerate(model_cfg.modalities)}
    if writer:
        n_params = sum(p.numel() for p in inner.parameters())
        log(f"training {cfg['model']['preset']} ({n_params / 1e6:.1f}M parameters) on {device} x{d.world}, "
            f"batch {B} ({accum} accumulation steps), {n_enc}/{n_dec} tokens, out {out}; MFU vs {peak:.2f} TFLOP/s ({peak_note})")

    last = {}
    steps_done = start
    last_saved = path if resume else None  # the newest checkpoint of this run, for the divergence message
    # A diverged run (NaN or inf loss / gradient norm) would go on training NaN weights, save them
    # and let keep-last-k delete the good checkpoints. Each step notes a non-finite value on the
    # device; every log line and every checkpoint reads the note first and stops the run.
    first_bad = torch.full((), _NEVER, dtype=torch.int64, device=device)

    checked_at = None  # a step both logged and checkpointed reads the note (a sync, an all-reduce) once

    def stop_if_diverged() -> None:
        nonlocal checked_at
        if checked_at == steps_done:
            return
        checked_at = steps_done
        bad = _first_nonfinite_step(first_bad, d)
        if bad is None:
            return
        saved = f"the newest checkpoint, {last_saved}, predates it" if last_saved else "this run wrote no checkpoint"
        progress.finish()
        if writer:
            metrics.close()
        raise TrainingDiverged(f"training diverged: the loss or the gradient norm was NaN or inf at step {bad} "
                               f"(seen at step {steps_done}); stopped without saving: {saved}")
    clip = tc["clip_grad"] if tc["clip_grad"] is not None else float("inf")  # inf: the norm only
    # Throughput is averaged over the steps since the last logged one (the logging sync waits for
    # all of them, so on a GPU the queued work of unlogged steps lands in this window), minus the
    # time spent writing checkpoints in it.
    window_start, window_steps, ckpt_s = time.perf_counter(), 0, 0.0
    with _StopFlag() as stop:
        if end == start:
            stop.signal = f"stop_after={tc['stop_after']}"
            if writer:
                log(f"the checkpoint is at step {start}, at or past train.stop_after={tc['stop_after']}: nothing to train")
        for step in range(start, end):
            gb, _ = source.global_batch(B, step)
            counts = gb.dec_counts
            loss_sum = torch.zeros((), device=device)
            mod_sums = {n: torch.zeros((), device=device) for n in inner.decoder_embeddings}
            for a in range(accum):
                lo = d.rank * per_rank + a * micro
                mb = slice_batch(gb, lo, lo + micro, len(inner.modalities)).to(device, non_blocking=True)
                sync = a == accum - 1 or not hasattr(model, "no_sync")
                with (nullcontext() if sync else model.no_sync()), autocast():
                    loss, per_mod = model(mb, tc["loss_type"], counts)
                (loss * d.world).backward()
                loss_sum += loss.detach()
                for n, v in per_mod.items():
                    mod_sums[n] += v.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(inner.parameters(), clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            first_bad = _note_nonfinite(first_bad, step + 1, loss_sum, grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step trains at (step() moves to the next)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps_done = step + 1
            window_steps += 1
            stop.poll(d)  # every process decides alike whether this step is the last
            if tc["stop_after"] is not None and steps_done >= tc["stop_after"] and not stop.signal:
                stop.signal = f"stop_after={tc['stop_after']}"
            if steps_done % cfg["log"]["every"] == 0 or steps_done == total or stop.signal:
                stats = torch.stack([loss_sum, *mod_sums.values()])
                if d.active:
                    dist.all_reduce(stats)
                stats = stats.tolist()
                dt = max(time.perf_counter() - window_start - ckpt_s, 1e-9) / window_steps
                vocab_tokens = sum(c * vocab[i] for i, c in enumerate(counts))
                flops = flops_per_step(model_cfg, B, n_enc, n_dec, vocab_tokens)
                # flops is the global batch's: against the peak of every process's device
                mfu = flops / dt / (peak * d.world * 1e12) if peak else None
                row = {"step": steps_done, "loss": stats[0], "lr": lr,
                       "grad_norm": float(grad_norm), "tokens_per_s": B * (n_enc + n_dec) / dt,
                       "step_time_s": dt, "mfu": mfu,
                       **{f"loss_{n}": v for n, v in zip(mod_sums, stats[1:])}}
                last = row
                if writer:
                    metrics.write(row)
                    progress.update(steps_done, row["loss"], row["tokens_per_s"], mfu)
                stop_if_diverged()  # after the row: metrics.csv shows the NaN that stopped the run
                window_start, window_steps, ckpt_s = time.perf_counter(), 0, 0.0
            every = cfg["checkpoint"]["every"]
            if (every and steps_done % every == 0) or steps_done == total or stop.signal:
                stop_if_diverged()
                t_ckpt = time.perf_counter()
                extra = {"model_config": model_cfg_dict, "config": cfg, "data_state": {"next_step": steps_done},
                         "tokenizers": getattr(source, "tokenizers", None),
                         "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                 "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
                path = save_checkpoint(ckpt_root, steps_done, model, inner, optimizer, scheduler, extra,
                                       cfg["checkpoint"]["keep"], writer)
                last_saved = path
                if writer and (stop.signal or steps_done == total):
                    log(f"checkpoint {path}")
                ckpt_s += time.perf_counter() - t_ckpt
            if stop.signal:
                progress.finish()
                if writer:
                    log(f"{stop.signal}: saved step {steps_done} and stopped; continue with --resume")
                break
    if writer:
        metrics.close()
    del model  # holds the process group (see _Distributed.close)
    d.close()
    return {"steps": steps_done, "out": str(out), "last": last, "stopped_by": stop.signal, "rank": d.rank}
