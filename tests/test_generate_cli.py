"""`fourm-fast generate` end to end on a checkpoint of a short synthetic-source training run:
files written, byte-identical for the same seed, clear errors for bad requests."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fourm_fast.cli import main
from fourm_fast.train.config import load_config
from fourm_fast.train.trainer import train
from small_training import SMALL_RUN

SMALL = SMALL_RUN + ["train.steps=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(load_config(None, SMALL + [f"out={out}"]), log=lambda m: None)
    return out


def _generate(run_dir, out, *extra):
    return main(["generate", "--checkpoint", str(run_dir), "--target", "rgb,depth,caption", "--steps", "3,2,1",
                 "--scheme", "maskgit,roar,autoregressive", "--cfg", "2.0", "--temperature", "1.0",
                 "--batch", "3", "--seed", "5", "--out", str(out), *extra])


def test_generate_writes_grid_text_tokens_settings_and_is_reproducible(run_dir, tmp_path):
    assert _generate(run_dir, tmp_path / "a") == 0
    assert _generate(run_dir, tmp_path / "b") == 0
    names = ["samples.png", "text.json", "settings.json", "tokens/rgb.npy", "tokens/depth.npy", "tokens/caption.npy"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    img = Image.open(tmp_path / "a" / "samples.png")
    assert img.size == (3 * 132, 3 * 146)  # 3 samples (rows) x 3 targets (columns) of 128 px tiles
    rgb = np.load(tmp_path / "a" / "tokens" / "rgb.npy")
    assert rgb.shape == (3, 16) and rgb.min() >= 0 and rgb.max() < 64
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert [t["scheme"] for t in settings["targets"]] == ["maskgit", "roar", "autoregressive"]
    assert len(json.loads((tmp_path / "a" / "text.json").read_text())["caption"]) == 3
    assert _generate(run_dir, tmp_path / "c", "--seed", "6") == 0
    assert (tmp_path / "c" / "tokens" / "rgb.npy").read_bytes() != (tmp_path / "a" / "tokens" / "rgb.npy").read_bytes()


def test_generate_with_a_token_grid_condition(run_dir, tmp_path):
    grid = tmp_path / "rgb.npy"
    np.save(grid, np.arange(16).reshape(4, 4) % 64)
    rc = main(["generate", "--checkpoint", str(run_dir), "--cond", f"rgb={grid}", "--target", "depth",
               "--cfg", "3", "--batch", "2", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert np.load(tmp_path / "o" / "tokens" / "depth.npy").shape == (2, 16)


@pytest.mark.parametrize("extra,message", [
    (["--target", "normal"], "unknown modality"),
    (["--target", "rgb", "--steps", "2,3"], "one per target"),
    (["--target", "rgb", "--cond", "caption=hello"], "no text tokenizer"),
    (["--target", "rgb", "--cond", "depth=/nonexistent.npy"], "no such file"),
    (["--target", "rgb", "--cond", "depth"], "MODALITY=VALUE"),
    (["--target", "caption", "--scheme", "maskgit"], "sequence modality"),
    (["--target", "rgb", "--cond", "normal=/nonexistent.npy"], "not an input modality of this model"),
])
def test_generate_bad_requests(run_dir, tmp_path, capsys, extra, message):
    assert main(["generate", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--target", "rgb", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
