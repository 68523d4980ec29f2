"""Checkpoints: ``DIR/checkpoints/step-NNNNNNN/{model.safetensors, state.pt}``.

model.safetensors holds the full (unsharded) model weights, each tied tensor once (the aliases are
in its metadata); state.pt the optimizer, scheduler, step, RNG and data-source state plus the model
config. A checkpoint is written into a temporary folder and renamed into place, so a crash never
leaves a half-written ``step-*`` folder; the oldest beyond ``keep`` are deleted afterwards.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    pass


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """alias -> canonical name for parameters that are the same tensor (tied heads, shared mod_emb)."""
    seen: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases


def _full(model):
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a rename is atomic, but without
    this a power loss right after it can leave the renamed folder holding empty files. Some
    filesystems (FUSE, network mounts) refuse to fsync a folder; that is no reason to fail a save."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES)):
            raise
    finally:
        os.close(fd)


# A writer's temporary names: .step-NNNNNNN.{tmp,old}-<host>-<pid>-<random>. The host and pid say
# whose it is; the random part tells this process's names from those of an earlier process that
# had the same pid (containers restart with the same small pids).
_LEFTOVER = re.compile(r"^\.(step-\d{7})\.(tmp|old)-(.+)-(\d{1,10})-([0-9a-f]{8})$")
_HOST = socket.gethostname().replace("/", "_")
_MINE: set[str] = set()  # names this process created


def _temp_name(final: Path, kind: str) -> Path:
    name = f".{final.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _MINE.add(name)
    return final.parent / name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(root: Path) -> None:
    """What writers killed mid-write left, on this host, whose process is gone (or is an earlier
    process with this one's pid): half-written temporary folders go; a checkpoint moved aside to be
    replaced goes back in place if its replacement never landed. Another host's names are left
    alone (its writer may be alive on a shared filesystem)."""
    if not root.is_dir():
        return
    for t in root.iterdir():
        m = _LEFTOVER.match(t.name)
        if not m or not t.is_dir() or m.group(3) != _HOST or t.name in _MINE:
            continue
        pid = int(m.group(4))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        final = root / m.group(1)
        if m.group(2) == "old" and not final.exists():
            os.replace(t, final)
        else:
            shutil.rmtree(t, ignore_errors=True)


def save_checkpoint(root: Path, step: int, model: nn.Module, inner: nn.Module, optimizer, scheduler, extra: dict,
                    keep: int, is_writer: bool) -> Path:
    """Every process must call this (sharded models gather their weights); one writes. Returns the
    checkpoint's folder on every process (a None on the others made their divergence message say
    that no checkpoint had been written)."""
    sd = get_model_state_dict(model, options=_full(model))
    osd = get_optimizer_state_dict(model, optimizer, options=_full(model))
    final = root / f"step-{step:07d}"
    if not is_writer:
        return final
    aliases = tied_aliases(inner)
    tensors = {k: v.detach().contiguous() for k, v in sd.items() if k not in aliases}
    root.mkdir(parents=True, exist_ok=True)
    recover_leftovers(root)
    tmp = _temp_name(final, "tmp")
    tmp.mkdir()
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"fourm_fast_aliases": json.dumps(aliases)})
    state = {"step": step, "optimizer": osd, "scheduler": scheduler.state_dict(), **extra}
    torch.save(state, tmp / STATE_FILE)
    for f in (tmp / MODEL_FILE, tmp / STATE_FILE, tmp):
        _fsync(f)
    old = None
    if final.exists():  # the same step written again: the old copy is moved aside, not deleted, until
        # the new one is in place (a writer killed between the two renames leaves it to be restored)
        old = _temp_name(final, "old")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)
    _MINE.discard(tmp.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _MINE.discard(old.name)
    # keep-last-k among this run's steps (none later than this one: the trainer refuses to start
    # a fresh run beside an older run's checkpoints)
    ours = [p for p in checkpoint_dirs(root) if int(p.name[5:]) <= step]
    for old in ours[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(root) if (d / MODEL_FILE).exists() and (d / STATE_FILE).exists()]
    return dirs[-1] if dirs else None


def _read_state(sfile: Path) -> dict:
    try:
        # weights_only: tensors, numbers, strings and containers, never code (a checkpoint from
        # elsewhere cannot run anything when loaded)
        state = torch.load(sfile, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"checkpoint file {sfile} is corrupt or unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint file {sfile} is not a fourm_fast training state")
    return state


def _require(state: dict, sfile: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {sfile} lacks {missing}: not a complete fourm_fast training state")


def _read_tensors(mfile: Path) -> dict:
    """The model tensors with tied aliases restored."""
    try:
        tensors = load_file(str(mfile))
        from safetensors import safe_open
        with safe_open(str(mfile), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("fourm_fast_aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {mfile} is corrupt or unreadable: {e}") from None
    for alias, canonical in aliases.items():
        if canonical in tensors:
            tensors[alias] = tensors[canonical]
    return tensors


def _refuse_nonfinite(tensors: dict, mfile: Path) -> None:
    """A checkpoint with NaN or inf weights (written by a diverged run before the trainer stopped
    such runs, or damaged) would resume or generate garbage without a word: refuse it by name."""
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(f"checkpoint file {mfile} holds NaN or inf weights in {len(bad)} tensors "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the run that wrote it had diverged")


def load_checkpoint(path: Path, model: nn.Module, inner: nn.Module, optimizer, scheduler, model_config: dict) -> dict:
    """Restore model, optimizer and scheduler; returns the rest of state.pt. Raises CheckpointError
    naming the file and what does not match."""
    mfile, sfile = path / MODEL_FILE, path / STATE_FILE
    for f in (mfile, sfile):
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: {f.name} is missing")
    state = _read_state(sfile)
    _require(state, sfile, ("optimizer", "scheduler", "rng", "model_config"))
    saved_cfg = state.get("model_config")
    if saved_cfg != model_config:
        diff = sorted(k for k in set(saved_cfg or {}) | set(model_config) if (saved_cfg or {}).get(k) != model_config.get(k))
        raise CheckpointError(f"checkpoint {sfile} was written for another model: config keys {diff} differ")
    tensors = _read_tensors(mfile)
    own = inner.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(tensors)
                    if own[k].shape != tensors[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint file {mfile} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shapes {shapes[:5]}")
    _refuse_nonfinite(tensors, mfile)
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A trained FourM for inference from a checkpoint folder (step-NNNNNNN) or a training output
    folder (its latest checkpoint): (model in eval mode, training config, checkpoint folder, the
    tokenizer files its shard tokens came from: {modality: {"file", "sha256"}}, None for the
    synthetic source or a checkpoint written before they were recorded)."""
    from ..model import FourM, FourMConfig

    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.is_dir() and not (path / MODEL_FILE).exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint ({MODEL_FILE} + {STATE_FILE}) found")
        path = latest
    mfile, sfile = path / MODEL_FILE, path / STATE_FILE
    for f in (mfile, sfile):
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: {f.name} is missing")
    state = _read_state(sfile)
    if "model_config" not in state:
        raise CheckpointError(f"checkpoint file {sfile} holds no model_config")
    model = FourM(FourMConfig.from_dict(state["model_config"]))
    tensors = _read_tensors(mfile)
    _refuse_nonfinite(tensors, mfile)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint file {mfile} does not match its model_config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval(), state.get("config", {}), path, state.get("tokenizers")
