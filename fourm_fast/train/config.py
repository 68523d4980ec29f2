"""Training configuration: a YAML file plus ``key.sub=value`` overrides, checked against the schema."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "model": {"preset": "tiny", "overrides": {}},
    "modalities": [
        {"name": "rgb", "kind": "image", "vocab_size": 1024, "grid": 14},
        {"name": "depth", "kind": "image", "vocab_size": 1024, "grid": 14},
        {"name": "caption", "kind": "sequence", "vocab_size": 1000, "max_length": 64},
    ],
    "data": {
        "source": "synthetic",
        "num_input_tokens": 128,
        "num_target_tokens": 128,
        "alphas_in": 0.5,     # one number for every modality, or {name: [per-component values]}
        "alphas_tg": 0.5,
        "weights": None,
        "num_sentinels": 100,  # synthetic sequences: sentinel ids are the last ids of the vocabulary
        "path": None,          # source "shards": a tokenized shard folder
        "max_text_tokens": 64,  # source "shards" with modalities "auto": sequence length cap
        "skip_bad": False,     # source "shards": leave out (and count) samples with bad token rows instead of raising
    },
    "train": {
        "steps": 100,
        "batch_size": 8,       # global, across processes and accumulation steps
        "grad_accum": 1,
        "lr": 1e-4,
        "min_lr": 1e-6,
        "warmup_steps": 10,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "clip_grad": 3.0,      # max gradient norm; null or 0: no clipping (the norm is still logged)
        "loss_type": "mod",
        "precision": "auto",   # auto: bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16
        "compile": False,      # true (inductor's default mode) or a torch.compile mode, e.g. reduce-overhead
        "seed": 0,
        "device": "auto",      # auto: cuda when available
        "stop_after": None,    # stop (with a checkpoint) after this step; the schedule still spans steps
    },
    "log": {"every": 1, "tensorboard": True, "progress": True, "peak_tflops": None},
    "checkpoint": {"every": 50, "keep": 3},  # keep: the newest k checkpoints; 0 keeps all
    "distributed": {"strategy": "ddp"},  # ddp | fsdp2 (used under torchrun)
    "out": "runs/tiny",
}


class ConfigError(ValueError):
    pass


def _merge(base: dict, extra: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if k not in out:
            raise ConfigError(f"unknown config key {where}{k!r} (known: {sorted(out)})")
        if isinstance(out[k], dict) and k != "overrides" and isinstance(v, dict):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _parse_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


# Paths are taken as written, not parsed as YAML: YAML read "my run #2" as "my run" (a comment)
# and 2024 as a number.
_PATH_KEYS = ("out", "data.path")


def _parse_path(text: str) -> str | None:
    """A path as written; quotes around all of it are dropped, and null (or ~) is no path."""
    if text.strip() in ("null", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def apply_override(cfg: dict, item: str) -> dict:
    """``train.lr=3e-4`` style: the value is parsed as YAML (paths, ``out`` and ``data.path``,
    are taken as written)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"override {item!r}: unknown key {'.'.join(parts[:i + 1])!r}")
        node = node[p]
    last = parts[-1]
    if not isinstance(node, dict) or (last not in node and not key.startswith("model.overrides.")):
        raise ConfigError(f"override {item!r}: unknown key {key!r}")
    parsed = _parse_path(value) if key.strip() in _PATH_KEYS else _parse_value(value)
    # a top-level section (train=..., data=...): merged, keys checked. Settings whose value may be a
    # mapping (data.alphas_in, model.overrides) are replaced whole.
    if len(parts) == 1 and isinstance(DEFAULTS.get(last), dict):
        if not isinstance(parsed, dict):
            raise ConfigError(f"override {item!r}: {key} is a section; give a mapping or set key.sub=value")
        parsed = _merge(node[last], parsed, f"{key}.")
    node[last] = parsed
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)  # one line: the problem and where
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
        except (OSError, UnicodeDecodeError) as e:  # a folder, an unreadable or a binary file
            raise ConfigError(f"config file {path} cannot be read as text: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        cfg = _merge(cfg, loaded, "")
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    validate(cfg)
    return cfg


_FLOAT_KEYS = ("lr", "min_lr", "weight_decay")
# torch.compile's modes; "reduce-overhead" replays CUDA graphs, which removes per-kernel launch cost
# from a host-bound GPU step (on the CPU it compiles as "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _number(value, where: str) -> float:
    """A float from a number or a numeric string (YAML 1.1 reads 1e-3 as a string); true/false are
    refused (Python would take them as 1 and 0)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None


def validate(cfg: dict) -> None:
    for section in ("model", "data", "train", "log", "checkpoint", "distributed"):
        if not isinstance(cfg[section], dict):
            raise ConfigError(f"{section} must be a mapping of settings, got {cfg[section]!r}")
    t = cfg["train"]
    for k in _FLOAT_KEYS:
        t[k] = _number(t[k], f"train.{k}")
    if not (math.isfinite(t["lr"]) and t["lr"] > 0 and math.isfinite(t["min_lr"]) and t["min_lr"] >= 0):
        raise ConfigError(f"train.lr must be > 0 and train.min_lr >= 0, got {t['lr']!r} and {t['min_lr']!r}")
    if t["min_lr"] > t["lr"]:  # the cosine would climb to min_lr instead of decaying
        raise ConfigError(f"train.min_lr {t['min_lr']} is above train.lr {t['lr']}")
    if not (math.isfinite(t["weight_decay"]) and t["weight_decay"] >= 0):
        raise ConfigError(f"train.weight_decay must be finite and >= 0, got {t['weight_decay']!r}")
    betas = t["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"train.betas must be a pair [beta1, beta2], got {betas!r}")
    t["betas"] = [_number(b, "train.betas") for b in betas]
    if not all(0 <= b < 1 for b in t["betas"]):
        raise ConfigError(f"train.betas must lie in [0, 1), got {t['betas']!r}")
    if isinstance(t["seed"], bool) or not isinstance(t["seed"], int) or not 0 <= t["seed"] < 2**63:
        raise ConfigError(f"train.seed must be an int in [0, 2**63), got {t['seed']!r}")
    if t["device"] not in ("auto", "cpu", "cuda"):  # any other value used to train on the CPU
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {t['device']!r} (pick a GPU with "
                          f"CUDA_VISIBLE_DEVICES; under torchrun each process takes its LOCAL_RANK's)")
    peak = cfg["log"]["peak_tflops"]
    if peak is not None:
        cfg["log"]["peak_tflops"] = peak = _number(peak, "log.peak_tflops")
        if not (math.isfinite(peak) and peak > 0):
            raise ConfigError(f"log.peak_tflops must be > 0 (or null: the device's), got {peak!r}")
    _validate_model(cfg["model"])
    if t["clip_grad"] is not None:
        t["clip_grad"] = _number(t["clip_grad"], "train.clip_grad")
        if t["clip_grad"] < 0:
            raise ConfigError(f"train.clip_grad must be >= 0 (0 or null: no clipping), got {t['clip_grad']!r}")
        if t["clip_grad"] == 0:
            t["clip_grad"] = None
    if t["loss_type"] not in ("mod", "token"):
        raise ConfigError(f"train.loss_type must be 'mod' or 'token', got {t['loss_type']!r}")
    if t["precision"] not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t['precision']!r}")
    if t["compile"] not in (True, False) and t["compile"] not in COMPILE_MODES:
        raise ConfigError(f"train.compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {t['compile']!r}")
    for k in ("steps", "batch_size", "grad_accum"):
        if isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] < 1:
            raise ConfigError(f"train.{k} must be a positive int, got {t[k]!r}")
    if cfg["checkpoint"]["every"] is None:  # null: no periodic checkpoints (the last step still gets one)
        cfg["checkpoint"]["every"] = 0
    for where, k, lo in (("train", "warmup_steps", 0), ("log", "every", 1), ("checkpoint", "every", 0),
                         ("checkpoint", "keep", 0)):
        v = cfg[where][k]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{where}.{k} must be an int >= {lo}, got {v!r}")
    if t["stop_after"] is not None and (not isinstance(t["stop_after"], int) or isinstance(t["stop_after"], bool)
                                        or t["stop_after"] < 1):
        raise ConfigError(f"train.stop_after must be a positive int or null, got {t['stop_after']!r}")
    if t["batch_size"] % t["grad_accum"]:
        raise ConfigError(f"train.batch_size {t['batch_size']} is not divisible by train.grad_accum {t['grad_accum']}")
    if cfg["distributed"]["strategy"] not in ("ddp", "fsdp2"):
        raise ConfigError(f"distributed.strategy must be ddp or fsdp2, got {cfg['distributed']['strategy']!r}")
    if cfg["data"]["source"] not in ("synthetic", "shards"):
        raise ConfigError(f"data.source must be 'synthetic' or 'shards', got {cfg['data']['source']!r}")
    if cfg["data"]["source"] == "shards" and not cfg["data"]["path"]:
        raise ConfigError("data.source 'shards' needs data.path (a folder after fourm-fast tokenize)")
    if not isinstance(cfg["data"]["skip_bad"], bool):
        raise ConfigError(f"data.skip_bad must be true or false, got {cfg['data']['skip_bad']!r}")
    if cfg["modalities"] == "auto" and cfg["data"]["source"] != "shards":
        raise ConfigError("modalities 'auto' reads them from tokenized shards (data.source: shards)")
    if cfg["data"]["source"] == "synthetic":  # shard settings would be ignored there without a word
        d = cfg["data"]
        given = [f"data.{k}" for k in ("path", "skip_bad", "max_text_tokens") if d[k] != DEFAULTS["data"][k]]
        if given:
            raise ConfigError(f"{', '.join(given)}: settings of data.source 'shards', which this config does not use "
                              f"(data.source: synthetic); set data.source=shards to train on shards")
    if not cfg["modalities"]:
        raise ConfigError("modalities: at least one modality is needed")
    mods = cfg["modalities"]
    if mods != "auto" and (not isinstance(mods, list) or not all(isinstance(m, dict) for m in mods)):
        raise ConfigError(f"modalities must be 'auto' or a list of mappings such as {{name: rgb, kind: image, "
                          f"vocab_size: 1024, grid: 14}}, got {mods!r}")
    for k in ("tensorboard", "progress"):
        if not isinstance(cfg["log"][k], bool):
            raise ConfigError(f"log.{k} must be true or false, got {cfg['log'][k]!r}")
    d = cfg["data"]
    for k, lo in (("num_sentinels", 0), ("max_text_tokens", 1)):  # token counts may be ranges: the sampler checks them
        if isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < lo:
            raise ConfigError(f"data.{k} must be an int >= {lo}, got {d[k]!r}")
    if d["weights"] is not None and not isinstance(d["weights"], list):
        raise ConfigError(f"data.weights must be a list of mixture weights or null, got {d['weights']!r}")
    if not isinstance(cfg["out"], str) or not cfg["out"]:
        raise ConfigError(f"out must be a folder path, got {cfg['out']!r} (quote it in YAML)")
    if Path(cfg["out"]).exists() and not Path(cfg["out"]).is_dir():
        raise ConfigError(f"out {cfg['out']} exists and is not a folder")
    if d["path"] is not None and not isinstance(d["path"], str):
        raise ConfigError(f"data.path must be a folder path or null, got {d['path']!r} (quote it in YAML)")


def _validate_model(m: dict) -> None:
    from ..model.config import PRESETS, FourMConfig

    if m["preset"] not in PRESETS:
        raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {m['preset']!r}")
    if not isinstance(m["overrides"], dict):
        raise ConfigError(f"model.overrides must be a mapping, got {m['overrides']!r}")
    fields = set(FourMConfig.__dataclass_fields__) - {"modalities", "domains_in", "domains_out"}
    unknown = sorted(set(m["overrides"]) - fields)
    if unknown:
        # domains_in / domains_out: the sampler draws inputs and targets from every modality
        raise ConfigError(f"model.overrides: unknown or unsupported keys {unknown} (known: {sorted(fields)}; "
                          f"training takes every modality as input and target)")


# Settings a resumed run may change: how long it runs (steps re-spans the cosine schedule from
# the resume point on), where and how it executes (device, precision, compile, the process count
# and accumulation steps, which change float summation order only), what it logs, where the data
# lies (data.path) and whether bad samples are skipped (the way on after a ShardError). Everything
# else (model, modalities, the data's sampling, the optimizer and schedule's hyper-parameters, the
# seed, the global batch) decides the steps themselves, so a resume that changed it would continue
# a different run than the checkpoint's.
RESUME_MAY_CHANGE = ("train.steps", "train.stop_after", "train.compile", "train.device", "train.precision",
                     "train.grad_accum", "data.path", "data.skip_bad", "log.", "checkpoint.", "distributed.", "out")


def _flatten(node, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and not prefix.endswith("overrides."):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _merge_missing(defaults: dict, saved: dict) -> dict:
    out = copy.deepcopy(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(out[k], dict) and k != "overrides":
            out[k] = _merge_missing(v, out[k])
    return out


def resume_mismatches(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every setting that differs between a checkpoint's config and the
    resuming run's, other than those in RESUME_MAY_CHANGE."""
    # the saved config over today's defaults: a key added since it was written counts as its default
    a, b = _flatten(_merge_missing(DEFAULTS, saved)), _flatten(now)
    # a shard-only setting means nothing to two synthetic-source runs (a checkpoint may carry one
    # from before such settings were refused there)
    synthetic = a.get("data.source") == b.get("data.source") == "synthetic"
    out = []
    for k in sorted(set(a) | set(b)):
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE):
            continue
        if synthetic and k == "data.max_text_tokens":
            continue
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out
