"""Trainer: exact resume, signals, checkpoint errors, config errors, DDP / FSDP2 on 2 CPU processes."""
import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fourm_fast.train.checkpoint import CheckpointError
from fourm_fast.train.config import ConfigError, load_config
from fourm_fast.train.trainer import train
from small_training import SMALL_RUN

ROOT = Path(__file__).resolve().parent.parent
SMALL = SMALL_RUN + ["train.warmup_steps=2", "train.lr=1e-3"]


def small_cfg(tmp_path, *extra):
    return load_config(None, SMALL + [f"out={tmp_path}"] + list(extra))


def rows(out) -> list[dict]:
    with open(Path(out) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_resume_continues_bit_exactly(tmp_path):
    straight = train(small_cfg(tmp_path / "a", "train.steps=6"), log=lambda m: None)
    assert straight["steps"] == 6
    half = train(small_cfg(tmp_path / "b", "train.steps=6", "train.stop_after=3"), log=lambda m: None)
    assert half["steps"] == 3 and half["stopped_by"] == "stop_after=3"
    resumed = train(small_cfg(tmp_path / "b", "train.steps=6"), resume=True, log=lambda m: None)
    assert resumed["steps"] == 6
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 7)]
    for ra, rb in zip(a, b):
        for k in ("loss", "lr", "grad_norm", "loss_rgb", "loss_caption"):
            assert ra[k] == rb[k], (ra["step"], k)  # the same float, digit for digit


def test_checkpoints_keep_last_k_and_are_complete(tmp_path):
    train(small_cfg(tmp_path, "train.steps=8", "checkpoint.keep=2"), log=lambda m: None)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-0000006", "step-0000008"]
    for c in ckpts:
        assert {p.name for p in (tmp_path / "checkpoints" / c).iterdir()} == {"model.safetensors", "state.pt"}


def test_corrupt_or_mismatched_checkpoints_raise_clear_errors(tmp_path):
    train(small_cfg(tmp_path, "train.steps=2"), log=lambda m: None)
    state = tmp_path / "checkpoints" / "step-0000002" / "state.pt"
    with pytest.raises(CheckpointError, match="was written for another model: config keys \\['dim'"):
        train(small_cfg(tmp_path, "train.steps=4", "model.overrides={dim: 16, encoder_depth: 1, decoder_depth: 1, num_heads: 2}"),
              resume=True, log=lambda m: None)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{state}.* corrupt"):
        train(small_cfg(tmp_path, "train.steps=4"), resume=True, log=lambda m: None)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(small_cfg(tmp_path / "empty", "train.steps=4"), resume=True, log=lambda m: None)


def test_resume_after_a_crash_drops_the_lost_steps_from_metrics(tmp_path):
    # A run that dies after its last checkpoint has logged steps the resumed run trains again:
    # metrics.csv keeps one row per step, the resumed ones.
    import shutil

    train(small_cfg(tmp_path, "train.steps=5", "checkpoint.every=3", "checkpoint.keep=5"), log=lambda m: None)
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000005")  # as if it had died after step 5's log row
    assert [int(r["step"]) for r in rows(tmp_path)] == [1, 2, 3, 4, 5]
    train(small_cfg(tmp_path, "train.steps=6", "checkpoint.every=3", "checkpoint.keep=5"), resume=True,
          log=lambda m: None)
    assert [int(r["step"]) for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_resume_after_a_crash_drops_the_lost_steps_from_tensorboard(tmp_path):
    # TensorBoard as metrics.csv: the lost steps' scalars give way to the resumed run's
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = ["checkpoint.every=3", "checkpoint.keep=5", "log.tensorboard=true"]
    train(small_cfg(tmp_path, "train.steps=5", *over), log=lambda m: None)
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000005")
    train(small_cfg(tmp_path, "train.steps=6", *over), resume=True, log=lambda m: None)
    events = EventAccumulator(str(tmp_path / "tensorboard"))  # reads as TensorBoard does
    events.Reload()
    scalars = events.Scalars("grad_norm")
    assert [s.step for s in scalars] == [1, 2, 3, 4, 5, 6]
    for s, r in zip(scalars, rows(tmp_path)):
        assert s.value == pytest.approx(float(r["grad_norm"]), rel=1e-6), s.step


def test_data_errors_are_config_errors(tmp_path):
    # the CLI turns ConfigError into a one-line message and exit code 2, not a traceback
    with pytest.raises(ConfigError, match="sentinels"):
        train(small_cfg(tmp_path, "train.steps=1", "data.num_sentinels=100000"), log=lambda m: None)
    with pytest.raises(ConfigError, match="decoder_causal_mask=True"):
        train(small_cfg(tmp_path, "train.steps=1", "model.overrides.decoder_causal_mask=true"), log=lambda m: None)


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown key 'train.lrr'"),
    (["train.compile=fast"], "train.compile must be true, false or one of default, reduce-overhead"),
    (["train.loss_type=sum"], "loss_type must be"),
    (["train.batch_size=6", "train.grad_accum=4"], "not divisible"),
    (["log.every=0"], "log.every must be an int >= 1"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.lr=.nan"], "train.lr must be > 0"),
    (["checkpoint.keep=two"], "checkpoint.keep must be an int >= 0"),
    (["train.warmup_steps=1.5"], "train.warmup_steps must be an int >= 0"),
    (["train.stop_after=true"], "train.stop_after must be a positive int"),
    (["train.clip_grad=-1"], "clip_grad must be >= 0"),
    # accepted and misused before: a CPU run for any device name, a rising "cosine", true as 1
    (["train.device=cuda:1"], "train.device must be auto, cpu or cuda"),
    (["train.device=gpu"], "train.device must be auto, cpu or cuda"),
    (["train.weight_decay=-0.5"], "weight_decay must be finite and >= 0"),
    (["train.min_lr=1e-2"], "train.min_lr 0.01 is above train.lr"),
    (["train.lr=true"], "train.lr must be a number, got True"),
    (["train.clip_grad=true"], "train.clip_grad must be a number"),
    (["train.steps=true"], "train.steps must be a positive int"),
    (["log.peak_tflops=-100"], "log.peak_tflops must be > 0"),
    (["log.peak_tflops=0"], "log.peak_tflops must be > 0"),
    (["model.overrides={domains_in: [rgb]}"], "unknown or unsupported keys \\['domains_in'\\]"),
    (["data.path=/my/shards"], "data.path: settings of data.source 'shards'"),
    # tracebacks before
    (["train.betas=0.9"], "train.betas must be a pair"),
    (["train.betas=[0.9, 1.5]"], "train.betas must lie in \\[0, 1\\)"),
    (["train.seed=1.5"], "train.seed must be an int"),
    (["model.preset=base"], "model.preset must be one of"),
    (["model.overrides={dimm: 32}"], "unknown or unsupported keys \\['dimm'\\]"),
    (["train=5"], "train is a section"),
    (["train={lrr: 1}"], "unknown config key train.'lrr'"),
    # accepted (a progress bar for 3, a string's characters for weights) or unclear before
    (["log.progress=3"], "log.progress must be true or false, got 3"),
    (["log.tensorboard=maybe"], "log.tensorboard must be true or false"),
    (["data.num_sentinels=abc"], "data.num_sentinels must be an int >= 0, got 'abc'"),
    (["data.weights=abc"], "data.weights must be a list of mixture weights or null"),
    (["data.source=shards", "data.path=/x", "modalities=auto", "data.max_text_tokens=0"], "data.max_text_tokens must be an int >= 1"),
    (["modalities=foo"], "modalities must be 'auto' or a list of mappings"),
    (["modalities=[rgb, depth]"], "modalities must be 'auto' or a list of mappings"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_min_lr_equal_to_lr_is_a_constant_rate():
    from fourm_fast.train.trainer import cosine_factor

    cfg = load_config(None, ["train.lr=3e-4", "train.min_lr=3e-4"])  # accepted: only above lr is refused
    t = cfg["train"]
    assert [cosine_factor(s, 10, 0, t["lr"], t["min_lr"]) for s in range(10)] == pytest.approx([1.0] * 10, rel=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.device=cuda, but no CUDA device is available"):
        train(small_cfg(tmp_path, "train.steps=1", "train.device=cuda"), log=lambda m: None)


def test_config_file_and_null_settings():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        load_config(ROOT / "configs")  # a folder: IsADirectoryError before
    assert load_config(None, ["checkpoint.every=null"])["checkpoint"]["every"] == 0  # null: off, as 0
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg["model"]["preset"] == "tiny" and cfg["train"]["batch_size"] == 8


@pytest.mark.parametrize("overrides,message", [
    (["model.overrides.dim=33"], "model: dim 33 is not divisible by num_heads 2"),
    (["modalities=[{name: rgb, kind: image, vocab: 64, grid: 4}]"], "modalities: .*unexpected keyword argument 'vocab'"),
    (["data.alphas_in={rgb: 0.5}"], "data.alphas_in: unknown modalities \\[\\], missing \\['depth', 'caption'\\]"),
    (["data.alphas_in={rgb: 0.5, depth: 0.5, captions: 0.5}"], "unknown modalities \\['captions'\\]"),
    (["data.num_target_tokens=0"], "data.num_target_tokens: at least one token is needed"),
    (["data.num_input_tokens=[5, 2]"], "data: num_input_tokens"),
])
def test_model_and_data_errors_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(small_cfg(tmp_path, "train.steps=1", *overrides), log=lambda m: None)


def test_config_file_errors_are_one_line(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"model:\n  preset: \xd0\xff\n")
    with pytest.raises(ConfigError, match="binary.yaml cannot be read as text"):  # UnicodeDecodeError before
        load_config(tmp_path / "binary.yaml")
    (tmp_path / "bad.yaml").write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML: expected ',' or ']'.* at line 3, column 1") as e:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_paths_are_taken_as_written(tmp_path):
    # YAML read "run #2" as "run" (a comment) and 2024 as a number (a TypeError in train)
    assert load_config(None, [f"out={tmp_path}/run #2"])["out"] == f"{tmp_path}/run #2"
    assert load_config(None, ["out=2024"])["out"] == "2024"
    assert load_config(None, ["out='runs/my run'"])["out"] == "runs/my run"  # quotes around it dropped
    assert load_config(None, ["data.path=/x", "data.path=null"])["data"]["path"] is None  # null: no path
    assert load_config(None, ["data.source=shards", "data.path=/data/shards 2"])["data"]["path"] == "/data/shards 2"
    (tmp_path / "a.yaml").write_text("out: 2024\n")
    with pytest.raises(ConfigError, match="out must be a folder path, got 2024 \\(quote it in YAML\\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile exists and is not a folder"):  # FileExistsError before
        load_config(None, [f"out={tmp_path / 'afile'}"])


def test_auto_resume_of_a_finished_run_trains_nothing(tmp_path):
    # a requeued job (or torchrun restart) of a run that had finished: exit cleanly, not with an error
    train(small_cfg(tmp_path, "train.steps=2"), log=lambda m: None)
    lines = []
    res = train(small_cfg(tmp_path, "train.steps=2"), resume="auto", log=lines.append)
    assert res["steps"] == 2 and res["last"] == {} and "it is complete, nothing to train" in lines[-1]
    assert [r["step"] for r in rows(tmp_path)] == ["1", "2"]
    with pytest.raises(CheckpointError, match="--auto-resume: the checkpoint is at step 2, the run has 1 steps"):
        train(small_cfg(tmp_path, "train.steps=1"), resume="auto", log=lambda m: None)
    with pytest.raises(CheckpointError, match="^--resume: the checkpoint is at step 2, the run has 2 steps"):
        train(small_cfg(tmp_path, "train.steps=2"), resume=True, log=lambda m: None)


def test_a_section_override_merges_and_yaml_strings_read_as_numbers(tmp_path):
    cfg = small_cfg(tmp_path, "train={lr: 1e-3}")
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["min_lr"] == 1e-6  # the rest of the section stays
    # a setting whose value is a mapping is replaced whole, never merged or taken for a section
    (tmp_path / "a.yaml").write_text("data:\n  alphas_in: {rgb: 0.5, depth: 0.5, caption: 1.0}\n")
    assert load_config(tmp_path / "a.yaml", SMALL + ["data.alphas_in=0.3"])["data"]["alphas_in"] == 0.3
    swapped = load_config(tmp_path / "a.yaml", SMALL + ["data.alphas_in={rgb: [0.5, 1.0], depth: [1, 1], caption: [1, 1]}"])
    assert swapped["data"]["alphas_in"] == {"rgb": [0.5, 1.0], "depth": [1, 1], "caption": [1, 1]}
    (tmp_path / "c.yaml").write_text("data:\n  alphas_in: 5e-1\n")  # YAML 1.1: the string '5e-1'
    cfg = load_config(tmp_path / "c.yaml", SMALL + [f"out={tmp_path}", "train.steps=1"])
    assert train(cfg, log=lambda m: None)["steps"] == 1


def test_a_micro_batch_without_targets_still_steps(tmp_path):
    # targets 0 or 1 per sample, 4 accumulation steps of one sample: some micro-batches have no
    # target at all; their detached zero loss raised in backward
    res = train(small_cfg(tmp_path, "train.steps=3", "data.num_target_tokens=[0, 1]", "train.grad_accum=4"),
                log=lambda m: None)
    assert res["steps"] == 3


def test_restarts_past_stop_after_train_nothing(tmp_path):
    # an unchanged --stop-after under --auto-resume restarts: each restart used to add a step
    for _ in range(3):
        res = train(small_cfg(tmp_path, "train.steps=6", "train.stop_after=2"), resume="auto", log=lambda m: None)
        assert res["steps"] == 2 and res["stopped_by"] == "stop_after=2"
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000002"]


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    one = train(small_cfg(tmp_path / "a", "train.steps=3"), log=lambda m: None)
    acc = train(small_cfg(tmp_path / "b", "train.steps=3", "train.grad_accum=2"), log=lambda m: None)
    for ra, rb in zip(rows(tmp_path / "a"), rows(tmp_path / "b")):
        # the loss alone would pass a gradient scaled by the accumulation count (Adam's update
        # ignores the scale); the norm would not
        for k in ("loss", "grad_norm"):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-5 * abs(float(ra[k])), (ra["step"], k)
    assert one["steps"] == acc["steps"] == 3


def test_fresh_run_refuses_an_out_folder_with_checkpoints(tmp_path):
    # keep-last-k sorts by step: a shorter fresh run beside an older run's checkpoints would delete
    # its own and leave --resume / generate the older run's
    train(small_cfg(tmp_path, "train.steps=4"), log=lambda m: None)
    with pytest.raises(CheckpointError, match="already holds checkpoints of an earlier run.*--resume"):
        train(small_cfg(tmp_path, "train.steps=2", "train.seed=1"), log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_resume_refuses_changed_settings_and_allows_more_steps(tmp_path):
    train(small_cfg(tmp_path, "train.steps=2"), log=lambda m: None)
    for change, key in (("train.weight_decay=0.5", "train.weight_decay: 0.05 -> 0.5"),
                        ("train.seed=3", "train.seed: 0 -> 3"), ("data.alphas_in=1.0", "data.alphas_in: 0.5 -> 1.0")):
        with pytest.raises(CheckpointError, match=re.escape(key)):
            train(small_cfg(tmp_path, "train.steps=4", change), resume=True, log=lambda m: None)
    res = train(small_cfg(tmp_path, "train.steps=4", "log.every=2", "checkpoint.keep=1"), resume=True,
                log=lambda m: None)
    assert res["steps"] == 4


def test_clip_grad_zero_or_null_turns_clipping_off(tmp_path):
    def weights_after(out, clip):
        train(small_cfg(out, "train.steps=2", f"train.clip_grad={clip}"), log=lambda m: None)
        from fourm_fast.train.checkpoint import load_model
        return load_model(out)[0].state_dict()

    clipped = weights_after(tmp_path / "a", "1e-12")  # a tiny max norm: steps of almost nothing
    off = weights_after(tmp_path / "b", "0")
    null = weights_after(tmp_path / "c", "null")
    for k in off:
        assert torch.equal(off[k], null[k]), k
    moved = max((off[k] - clipped[k]).abs().max().item() for k in off)
    assert moved > 1e-4
    assert all(float(r["grad_norm"]) > 0 for r in rows(tmp_path / "b"))  # still measured and logged
    with pytest.raises(ConfigError, match="clip_grad must be >= 0"):
        load_config(None, ["train.clip_grad=-1"])


def test_lr_schedule_values():
    """The schedule against hand values and 4M's cosine_scheduler written out (iters = arange(n),
    final + (base - final) (1 + cos(pi iters / n)) / 2); the other lr tests take cosine_factor as given."""
    from fourm_fast.train.trainer import cosine_factor

    lr, lo = 1e-3, 1e-5

    def rate(step, total, warmup):
        return lr * cosine_factor(step, total, warmup, lr, lo)

    assert [rate(s, 10, 4) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)
    assert rate(4, 10, 4) == pytest.approx(lr, rel=1e-12)  # the cosine starts at lr
    assert rate(7, 10, 4) == pytest.approx((lr + lo) / 2, rel=1e-12)  # i = 3 of n = 6: cos(pi / 2) = 0
    n = 6
    assert [rate(s, 10, 4) for s in range(4, 10)] == pytest.approx(
        [lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * i / n)) for i in range(n)], rel=1e-12)
    assert lo < rate(9, 10, 4) < lo + 0.1 * (lr - lo)  # the last step: just above min_lr
    assert rate(10, 10, 4) == pytest.approx(lo, rel=1e-12) and rate(99, 10, 4) == pytest.approx(lo, rel=1e-12)
    assert [rate(s, 2, 0) for s in range(2)] == pytest.approx([lr, (lr + lo) / 2], rel=1e-12)


def test_logged_lr_is_the_rate_the_step_trained_at(tmp_path):
    from fourm_fast.train.trainer import cosine_factor

    train(small_cfg(tmp_path, "train.steps=5", "train.warmup_steps=3"), log=lambda m: None)
    got = [float(r["lr"]) for r in rows(tmp_path)]
    want = [1e-3 * cosine_factor(s, 5, 3, 1e-3, 1e-6) for s in range(5)]  # step s trains at factor(s)
    assert got == pytest.approx(want, rel=1e-6)


def test_resume_with_more_steps_trains_on_the_new_schedule_at_once(tmp_path):
    # The first resumed step trained at the old schedule's last rate (min_lr here), then jumped.
    from fourm_fast.train.trainer import cosine_factor

    train(small_cfg(tmp_path, "train.steps=4", "train.warmup_steps=0"), log=lambda m: None)
    train(small_cfg(tmp_path, "train.steps=8", "train.warmup_steps=0"), resume=True, log=lambda m: None)
    got = [float(r["lr"]) for r in rows(tmp_path)][4:]
    assert got == pytest.approx([1e-3 * cosine_factor(s, 8, 0, 1e-3, 1e-6) for s in range(4, 8)], rel=1e-6)


def test_stop_after_step_is_logged_with_sparse_logging(tmp_path):
    train(small_cfg(tmp_path, "train.steps=6", "log.every=4", "train.stop_after=3"), log=lambda m: None)
    assert [int(r["step"]) for r in rows(tmp_path)] == [3]
    train(small_cfg(tmp_path, "train.steps=6", "log.every=4"), resume=True, log=lambda m: None)
    assert [int(r["step"]) for r in rows(tmp_path)] == [3, 4, 6]


def test_resume_leaves_the_global_rng_as_a_straight_run_does(tmp_path):
    # the MFU probe must not draw from the generator the checkpoint restored
    train(small_cfg(tmp_path / "a", "train.steps=4"), log=lambda m: None)
    straight = torch.get_rng_state()
    train(small_cfg(tmp_path / "b", "train.steps=4", "train.stop_after=2"), log=lambda m: None)
    train(small_cfg(tmp_path / "b", "train.steps=4"), resume=True, log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), straight)


def test_resume_continues_the_global_rng_streams(tmp_path, monkeypatch):
    """A step that draws from torch's and Python's global generators (dropout, an augmentation)
    continues the straight run's streams after a resume: train() seeds both when it starts, so only
    the states the checkpoint restores make the two runs agree (no step of ours draws today, which
    left the restore untested; Python's was not seeded, so even straight runs differed)."""
    import random

    from fourm_fast.model import FourM

    forward = FourM.forward

    def drawing_forward(self, *args, **kwargs):
        torch.rand(3)
        random.random()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FourM, "forward", drawing_forward)
    random.seed(7)  # the straight run does not depend on what the process drew before it
    train(small_cfg(tmp_path / "a", "train.steps=4"), log=lambda m: None)
    straight = torch.get_rng_state(), random.getstate()
    train(small_cfg(tmp_path / "b", "train.steps=4", "train.stop_after=2"), log=lambda m: None)
    torch.manual_seed(123)  # whatever the process did in between
    random.seed(123)
    train(small_cfg(tmp_path / "b", "train.steps=4"), resume=True, log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), straight[0]) and random.getstate() == straight[1]


@pytest.mark.parametrize("setting,mode", [("true", "default"), ("reduce-overhead", "reduce-overhead"),
                                          ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_setting_reaches_torch_compile(tmp_path, monkeypatch, setting, mode):
    # train.compile: true is inductor's default mode; a mode string is passed to torch.compile as is
    import fourm_fast.train.trainer as trainer_mod

    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(trainer_mod.torch, "compile", fake_compile)
    train(small_cfg(tmp_path, "train.steps=1", f"train.compile={setting}"), log=lambda m: None)
    assert seen == [{"mode": mode}]


def test_compiled_training_matches_eager(tmp_path):
    # train.compile wraps forward_hidden in torch.compile (inductor): masked_attention and the
    # other ops must trace, and the compiled step must train like the eager one.
    from torch._dynamo.utils import counters

    eager = train(small_cfg(tmp_path / "a", "train.steps=3"), log=lambda m: None)
    counters.clear()
    compiled = train(small_cfg(tmp_path / "b", "train.steps=3", "train.compile=true"), log=lambda m: None)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the step
    assert eager["steps"] == compiled["steps"] == 3
    for ra, rb in zip(rows(tmp_path / "a"), rows(tmp_path / "b"), strict=True):
        assert abs(float(ra["loss"]) - float(rb["loss"])) <= 1e-4 * abs(float(ra["loss"])), ra["step"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait_for_rows(proc: subprocess.Popen, out: Path, n: int, timeout: float) -> None:
    """Until the trainer has logged n steps; fails at once if it exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.csv").exists() and len(rows(out)) >= n):
        if proc.poll() is not None:
            pytest.fail(f"the trainer exited with {proc.returncode} before step {n}:\n{proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the trainer logged no {n} steps within {timeout} s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, workers=()) -> None:
    """A test's trainer still running after a failure: SIGTERM (torchrun passes it on to its
    workers, which run in sessions of their own and would outlive a killed agent), then SIGKILL
    to the agent and to any worker left."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    # --steps is large enough for the signal to land mid-run, small enough that a trainer left
    # behind by a broken test ends on its own
    cmd = [sys.executable, "-m", "fourm_fast", "train", "--steps", "3000", "--out", str(tmp_path), *SMALL,
           "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(proc, tmp_path, 2, 120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved step" in err
    assert any((tmp_path / "checkpoints").iterdir())


def _torchrun(out, strategy, extra=(), steps=3, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "fourm_fast.train", "--steps", str(steps), "--out", str(out), *(["--resume"] if resume else []), *SMALL,
           f"distributed.strategy={strategy}", *extra]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, strategy):
    """2 processes x half the batch (gloo, CPU) take the steps one process takes with the whole batch."""
    single = tmp_path / "single"
    train(small_cfg(single, "train.steps=3", "log.peak_tflops=2.0"), log=lambda m: None)
    _torchrun(tmp_path / strategy, strategy, ("log.peak_tflops=2.0",))
    for ra, rb in zip(rows(single), rows(tmp_path / strategy)):
        for k in ("loss", "loss_rgb", "loss_caption", "grad_norm"):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-5 * max(1.0, abs(float(ra[k]))), (strategy, ra["step"], k)
        # MFU = the global batch's FLOPs / step time / (peak x processes): the same FLOPs in both runs
        flops_a = float(ra["mfu"]) * float(ra["step_time_s"]) * 2.0e12
        flops_b = float(rb["mfu"]) * float(rb["step_time_s"]) * 2.0e12 * 2
        assert flops_b == pytest.approx(flops_a, rel=1e-3), (strategy, ra["step"])
    assert len(rows(tmp_path / strategy)) == 3


def _worker_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker of ``parent`` whose environment says RANK=rank (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="lists threads through Linux /proc")
def test_ddp_process_group_is_torn_down_before_interpreter_exit(tmp_path):
    # CI once saw a DDP worker abort after a successful run ("terminate called without an active
    # exception"): the group, held by DDP's reducer in a reference cycle, was destroyed during
    # interpreter finalization. train() must leave no gloo thread behind on any rank. (Under FSDP2,
    # torch's own DTensor caches keep the group alive past train(), so only DDP is checked.)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "train_then_list_threads.py"), str(tmp_path), "ddp"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    for rank in range(2):
        names = (tmp_path / f"threads-rank{rank}.txt").read_text()
        assert "python" in names, names  # the list was read
        assert "gloo" not in names, f"rank {rank}: {names}"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the torchrun workers through Linux /proc")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sigterm_on_one_process_stops_every_process(tmp_path, strategy):
    # A signal that reaches one worker only: every worker must stop after the same step, save and
    # exit 0; a worker stopping alone would leave the others hanging in the next collective.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "fourm_fast.train", "--steps", "3000", "--out", str(tmp_path), *SMALL, f"distributed.strategy={strategy}",
           "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        _wait_for_rows(proc, tmp_path, 2, 180)
        workers = [w for w in (_worker_pid(proc.pid, r) for r in (0, 1)) if w is not None]
        worker = _worker_pid(proc.pid, 1)
        assert worker is not None, "no worker with RANK=1 under torchrun"
        os.kill(worker, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _stop(proc, workers)
    assert proc.returncode == 0, err[-4000:]
    assert "SIGTERM: saved step" in err  # logged by rank 0, which never got the signal itself
    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert saved and int(saved[-1].name.split("-")[1]) == len(rows(tmp_path))


def test_cli_runs_the_shipped_config_with_overrides(tmp_path):
    cmd = [sys.executable, "-m", "fourm_fast", "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--steps", "2",
           "--out", str(tmp_path), *SMALL]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "done: 2 steps" in res.stderr
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "loss", "lr", "grad_norm", "tokens_per_s"]
    bad = subprocess.run([sys.executable, "-m", "fourm_fast", "train", "train.nope=1"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown key 'train.nope'" in bad.stderr
    # overrides after a flag count too; so does the config given as a lone positional file
    cmd = [sys.executable, "-m", "fourm_fast", "train", str(ROOT / "configs" / "tiny.yaml"), *SMALL[:3], "--steps", "1",
           "--out", str(tmp_path / "mixed"), *SMALL[3:], "train.seed=5"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "done: 1 steps" in res.stderr
    cmd = [sys.executable, "-m", "fourm_fast", "train", *SMALL[:3], "--steps", "1", "--out", str(tmp_path / "late"),
           *SMALL[3:], str(ROOT / "configs" / "tiny.yaml")]  # the config file after overrides and flags
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    bad = subprocess.run([sys.executable, "-m", "fourm_fast", "train", "--steps", "1", "--nope"], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments: --nope" in bad.stderr
    assert torch.__version__  # the environment under test


def test_cli_auto_resume_and_conflicting_arguments(tmp_path):
    base = [sys.executable, "-m", "fourm_fast", "train", "--auto-resume", "--steps", "2", "--out", str(tmp_path), *SMALL]
    first = subprocess.run(base + ["--stop-after", "1"], env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "done: 1 steps" in first.stderr, first.stderr
    second = subprocess.run(base, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "done: 2 steps" in second.stderr, second.stderr
    assert [int(r["step"]) for r in rows(tmp_path)] == [1, 2]
    both = subprocess.run(base + ["--resume"], env=_env(), capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr
    tiny = str(ROOT / "configs" / "tiny.yaml")
    two = subprocess.run([sys.executable, "-m", "fourm_fast", "train", "--config", tiny, tiny, "--out", str(tmp_path / "x")],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert two.returncode == 2 and "one config file at most" in two.stderr, two.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_resume_with_accumulation_is_bit_exact(tmp_path, strategy):
    # Two processes, two micro-batches each: the steps of one process with the whole batch, and
    # stopping at step 2 then resuming gives the straight run's losses digit for digit (under FSDP2
    # the sharded optimizer state is gathered into the checkpoint and sharded again on load).
    train(small_cfg(tmp_path / "single", "train.steps=4"), log=lambda m: None)
    _torchrun(tmp_path / "straight", strategy, ("train.grad_accum=2",), steps=4)
    for ra, rb in zip(rows(tmp_path / "single"), rows(tmp_path / "straight"), strict=True):
        for k in ("loss", "grad_norm"):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-5 * max(1.0, abs(float(ra[k]))), (strategy, ra["step"], k)
    _torchrun(tmp_path / "resumed", strategy, ("train.grad_accum=2", "train.stop_after=2"), steps=4)
    assert [r["step"] for r in rows(tmp_path / "resumed")] == ["1", "2"]
    _torchrun(tmp_path / "resumed", strategy, ("train.grad_accum=2",), steps=4, resume=True)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "grad_norm", "loss_rgb", "loss_caption"):
            assert ra[k] == rb[k], (strategy, ra["step"], k)


def test_corrupt_or_incomplete_model_file_raises_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from fourm_fast.train.checkpoint import load_model

    train(small_cfg(tmp_path, "train.steps=2"), log=lambda m: None)
    mfile = tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"
    tensors = load_file(str(mfile))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(mfile))
    with pytest.raises(CheckpointError, match=re.escape(str(mfile)) + f" does not match the model: missing \\['{dropped}'"):
        train(small_cfg(tmp_path, "train.steps=4"), resume=True, log=lambda m: None)
    with pytest.raises(CheckpointError, match=re.escape(str(mfile)) + f" does not match its model_config: missing \\['{dropped}'"):
        load_model(tmp_path)
    mfile.write_bytes(mfile.read_bytes()[:200])  # a write cut short
    with pytest.raises(CheckpointError, match=re.escape(str(mfile)) + " is corrupt"):
        train(small_cfg(tmp_path, "train.steps=4"), resume=True, log=lambda m: None)
    with pytest.raises(CheckpointError, match=re.escape(str(mfile)) + " is corrupt"):
        load_model(tmp_path)


def test_tensorboard_scalars_match_metrics_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_cfg(tmp_path, "train.steps=3", "log.tensorboard=true"), log=lambda m: None)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    csv_rows = rows(tmp_path)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_rgb", "loss_caption"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3], key
        for s, r in zip(scalars, csv_rows):  # TensorBoard stores float32
            assert s.value == pytest.approx(float(r[key]), rel=1e-6), (key, s.step)


def test_progress_line_shows_step_loss_throughput_and_mfu(tmp_path, capsys):
    import io

    from fourm_fast.train.metrics import Progress

    train(small_cfg(tmp_path, "train.steps=2", "log.progress=true"), log=lambda m: None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "step " in ln and "tok/s" in ln]
    assert [ln.split("step ")[1].split()[0] for ln in lines] == ["1/2", "2/2"]  # not a terminal: a line per step
    last = rows(tmp_path)[-1]
    assert f"loss {float(last['loss']):.4f}" in lines[-1] and " mfu " in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = Progress(total=2, enabled=True, stream=term)
    bar.update(1, 2.5, 1234.0, 0.25)
    bar.update(2, 2.25, 1500.0, None)
    out = term.getvalue()
    assert out.startswith("\r[############------------] step 1/2 loss 2.5000 1,234 tok/s mfu  25.0%")
    assert "\r[########################] step 2/2 loss 2.2500 1,500 tok/s" in out and out.endswith("\n")
    assert out.count("\n") == 1  # rewritten in place, one newline at the end
    bar.finish()  # nothing left open
    assert term.getvalue() == out
    cut = Terminal()  # a run stopped mid-way (signal, divergence): its message starts a new line
    bar = Progress(total=4, enabled=True, stream=cut)
    bar.update(1, 2.5, 1234.0, None)
    bar.finish()
    bar.finish()
    assert cut.getvalue().endswith("tok/s    \n") and cut.getvalue().count("\n") == 1


def test_cpu_peak_probe_counts_the_flops_it_times(monkeypatch):
    """The probe's rate is its two 1024^3 products' FLOPs (2 x 2 x 1024^3) over the best timing and
    each product is timed: on a clock that advances 0.5 s per reading, 4.29 GFLOP in 0.5 s."""
    import fourm_fast.train.metrics as metrics

    ticks = iter(range(10**6))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: 0.5 * next(ticks))
    products = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(a.shape + b.shape) or real_mm(a, b))
    assert metrics.measured_cpu_tflops() == pytest.approx(2 * 2 * 1024**3 / 0.5 / 1e12, rel=1e-12)
    assert products == [(1024, 1024, 1024, 1024)] * 11  # one warm-up, then five timed pairs


def test_flops_per_step_counts_what_a_step_executes():
    # The MFU numerator against torch's FLOP counter on one forward + backward, with as many
    # encoder as decoder tokens and without (the cross-attention's keys and values are projected
    # from the encoder's tokens)
    from bench.flops import count_flops
    from fourm_fast.model import FourM
    from fourm_fast.train.metrics import flops_per_step
    from fourm_fast.train.synthetic import SyntheticSource
    from fourm_fast.train.trainer import build_model_config

    for n_in, n_tg in ((10, 10), (14, 9)):
        cfg = load_config(None, SMALL_RUN + [f"data.num_input_tokens={n_in}", f"data.num_target_tokens={n_tg}"])
        model_cfg = build_model_config(cfg)
        torch.manual_seed(0)
        model = FourM(model_cfg)
        source = SyntheticSource(model_cfg, cfg["data"], 0)
        batch, _ = source.global_batch(4, 0)

        def step():
            model(batch, "mod")[0].backward()

        vocab_tokens = sum(c * m.vocab_size for c, m in zip(batch.dec_counts, model_cfg.modalities))
        assert count_flops(step) == flops_per_step(model_cfg, 4, n_in, n_tg, vocab_tokens), (n_in, n_tg)


def test_checkpoint_writer_cleans_up_after_killed_writers(tmp_path):
    # What a writer killed mid-save leaves behind, as a dead process would name it on this host: a
    # half-written temporary folder (removed) and a checkpoint moved aside whose replacement never
    # landed (put back before any decision is taken); another host's names are left alone.
    import shutil as sh
    import socket

    train(small_cfg(tmp_path, "train.steps=2", "checkpoint.keep=5"), log=lambda m: None)
    root = tmp_path / "checkpoints"
    host, dead = socket.gethostname(), 2**22 + 12345  # above Linux's default pid_max: no such process
    (root / f".step-0000004.tmp-{host}-{dead}-0badf00d").mkdir()
    (root / f".step-0000004.tmp-{host}-{dead}-0badf00d" / "model.safetensors").write_bytes(b"partial")
    sh.copytree(root / "step-0000002", root / f".step-0000001.old-{host}-{dead}-0123abcd")
    other = root / f".step-0000003.tmp-elsewhere.example-{dead}-0123abcd"
    other.mkdir()
    odd = root / ".step-0000004-backup-2024"  # not a writer's name
    odd.mkdir()
    train(small_cfg(tmp_path, "train.steps=4", "checkpoint.keep=5"), resume=True, log=lambda m: None)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        ["step-0000001", "step-0000002", "step-0000004"]
    assert other.is_dir() and odd.is_dir()
    # recovery runs before the fresh-run check: a restored step counts as an earlier run's
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    sh.copytree(root / "step-0000002", fresh / "checkpoints" / f".step-0000002.old-{host}-{dead}-0123abcd")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(small_cfg(fresh, "train.steps=2"), log=lambda m: None)


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Both files and the temporary folder are fsynced before the rename makes the checkpoint
    visible, and the parent folder after it (a power loss must not leave a visible checkpoint of
    empty files)."""
    import fourm_fast.train.checkpoint as ckpt

    events = []
    fsync, replace = ckpt._fsync, os.replace
    monkeypatch.setattr(ckpt, "_fsync", lambda p: events.append(("fsync", Path(p).name)) or fsync(p))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or replace(a, b))
    train(small_cfg(tmp_path, "train.steps=1"), log=lambda m: None)
    at = events.index(("rename", "step-0000001"))
    before = {name for kind, name in events[:at] if kind == "fsync"}
    assert {ckpt.MODEL_FILE, ckpt.STATE_FILE} <= before and any(n.startswith(".step-0000001.tmp-") for n in before)
    assert ("fsync", "checkpoints") in events[at:]


def test_leftovers_of_an_earlier_process_with_this_pid_are_recovered(tmp_path):
    """A restarted container often runs the trainer under the pid the killed one had: its leftovers
    are an earlier process's (not this one's, which it has not made), so they are cleaned up, while
    a live other process's are left alone."""
    import socket

    from fourm_fast.train.checkpoint import recover_leftovers

    host = socket.gethostname()
    mine = tmp_path / f".step-0000004.tmp-{host}-{os.getpid()}-0badf00d"
    live = tmp_path / f".step-0000005.tmp-{host}-{os.getppid()}-0badf00d"
    for d in (mine, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    recover_leftovers(tmp_path)
    assert not mine.exists() and live.is_dir()


def test_auto_resume_starts_fresh_or_continues(tmp_path):
    first = train(small_cfg(tmp_path, "train.steps=4", "train.stop_after=2"), resume="auto", log=lambda m: None)
    assert first["steps"] == 2
    second = train(small_cfg(tmp_path, "train.steps=4"), resume="auto", log=lambda m: None)
    assert second["steps"] == 4 and [int(r["step"]) for r in rows(tmp_path)] == [1, 2, 3, 4]


def test_resume_accepts_what_only_changes_how_the_run_executes(tmp_path):
    # accumulation (summation order only), a moved data path, and configs written before a key
    # existed (the key counts as its default)
    train(small_cfg(tmp_path, "train.steps=2"), log=lambda m: None)
    state_file = tmp_path / "checkpoints" / "step-0000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["data"]["skip_bad"]
    torch.save(state, state_file)
    res = train(small_cfg(tmp_path, "train.steps=3", "train.grad_accum=2"), resume=True, log=lambda m: None)
    assert res["steps"] == 3
    # shard runs: a moved data folder and skip_bad (the way on after a ShardError) may change too
    from fourm_fast.train.config import resume_mismatches

    shards = ["data.source=shards", "data.path=/data", "modalities=auto"]
    saved = load_config(None, shards)
    assert resume_mismatches(saved, load_config(None, shards + ["data.path=/moved", "data.skip_bad=true"])) == []
    assert resume_mismatches(saved, load_config(None, shards + ["data.num_input_tokens=64"])) != []
    old = load_config(None)  # a synthetic run's checkpoint from before shard settings were refused there
    old["data"]["max_text_tokens"] = 128
    assert resume_mismatches(old, load_config(None)) == []


class _NanGrad(torch.autograd.Function):
    """The loss unchanged forward, NaN gradients backward: a divergence the loss does not show."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison_step(monkeypatch, at: int, kind: str) -> None:
    """FourM.forward's loss turns NaN ("loss") or +inf ("inf"), or its gradients NaN ("grad"), at
    call number ``at`` (one call per step without accumulation)."""
    from fourm_fast.model import FourM

    forward, calls = FourM.forward, [0]

    def poisoned(self, *args, **kwargs):
        loss, per_mod = forward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == at:
            loss = {"loss": lambda x: x * float("nan"), "inf": lambda x: x + float("inf"), "grad": _NanGrad.apply}[kind](loss)
        return loss, per_mod

    monkeypatch.setattr(FourM, "forward", poisoned)


def _finite_checkpoints(out) -> list[str]:
    from safetensors.torch import load_file

    names = []
    for c in sorted((Path(out) / "checkpoints").iterdir()):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(c / "model.safetensors").values()), c.name
        names.append(c.name)
    return names


@pytest.mark.parametrize("kind", ["loss", "inf", "grad"])
def test_a_diverged_run_stops_before_saving_nan_weights(tmp_path, monkeypatch, kind):
    # Before this check, a NaN at step 3 trained on to the end and exited 0: every later checkpoint
    # held NaN weights and keep-last-k deleted the good ones.
    from fourm_fast.train.trainer import TrainingDiverged

    _poison_step(monkeypatch, 3, kind)
    with pytest.raises(TrainingDiverged, match=r"NaN or inf at step 3 \(seen at step 3\); stopped without saving: "
                                               r"the newest checkpoint, .*step-0000002, predates it"):
        train(small_cfg(tmp_path, "train.steps=8", "checkpoint.keep=1"), log=lambda m: None)
    assert _finite_checkpoints(tmp_path) == ["step-0000002"]
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == ["1", "2", "3"]
    assert all(math.isfinite(float(r["loss"])) for r in logged[:2])
    bad = logged[2]["grad_norm"] if kind == "grad" else logged[2]["loss"]
    assert not math.isfinite(float(bad))


def test_divergence_between_log_lines_is_caught_at_the_next_one(tmp_path, monkeypatch):
    from fourm_fast.train.trainer import TrainingDiverged

    _poison_step(monkeypatch, 1, "loss")
    with pytest.raises(TrainingDiverged, match=r"at step 1 \(seen at step 2\); stopped without saving: this run wrote no checkpoint"):
        train(small_cfg(tmp_path, "train.steps=8", "log.every=4"), log=lambda m: None)
    assert not list((tmp_path / "checkpoints").glob("step-*"))  # the step-2 checkpoint checks first


def test_divergence_is_read_once_per_step(tmp_path, monkeypatch):
    # The read is a host sync (and an all-reduce under torchrun): a step both logged and
    # checkpointed pays it once.
    from fourm_fast.train import trainer

    seen = []
    read = trainer._first_nonfinite_step
    monkeypatch.setattr(trainer, "_first_nonfinite_step", lambda *a: seen.append(1) or read(*a))
    train(small_cfg(tmp_path, "train.steps=4", "log.every=2", "checkpoint.every=2"), log=lambda m: None)
    assert len(seen) == 2


def test_checkpoints_with_nan_weights_are_refused_by_name(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fourm_fast.train.checkpoint import load_model

    train(small_cfg(tmp_path, "train.steps=2"), log=lambda m: None)
    mfile = tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"
    tensors = load_file(mfile)
    with safe_open(str(mfile), "pt") as f:
        meta = f.metadata()
    name = sorted(tensors)[0]
    tensors[name][..., 0] = float("inf")
    save_file(tensors, mfile, metadata=meta)
    with pytest.raises(CheckpointError, match=re.escape(f"{mfile} holds NaN or inf weights in 1 tensors ({name})")):
        train(small_cfg(tmp_path, "train.steps=4"), resume=True, log=lambda m: None)
    with pytest.raises(CheckpointError, match=re.escape(f"{mfile} holds NaN or inf weights")):
        load_model(tmp_path)


def test_cli_reports_divergence_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    from fourm_fast.cli import main

    _poison_step(monkeypatch, 2, "loss")
    rc = main(["train", "--steps", "4", "--out", str(tmp_path), *SMALL])
    assert rc == 1
    err = capsys.readouterr().err
    assert "fourm-fast train: training diverged: the loss or the gradient norm was NaN or inf at step 2" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_divergence_on_one_process_stops_every_process(tmp_path, strategy):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "train_with_nan_loss.py"), str(tmp_path), strategy]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stderr[-4000:]
    for rank in range(2):
        err = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "NaN or inf at step 3 (seen at step 3)" in err, (rank, err)
        assert "step-0000002, predates it" in err, (rank, err)  # rank 1 said "this run wrote no checkpoint"
    assert _finite_checkpoints(tmp_path) == ["step-0000002"]
