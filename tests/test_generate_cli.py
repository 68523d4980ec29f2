"""`fourm-fast generate` end to end on a checkpoint of a short synthetic-source training run:
files written, byte-identical for the same seed, clear errors for bad requests."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
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
    assert settings["seed"] == 5  # what reproduces the run is written down
    assert len(json.loads((tmp_path / "a" / "text.json").read_text())["caption"]) == 3
    assert _generate(run_dir, tmp_path / "c", "--seed", "6") == 0
    assert (tmp_path / "c" / "tokens" / "rgb.npy").read_bytes() != (tmp_path / "a" / "tokens" / "rgb.npy").read_bytes()
    assert json.loads((tmp_path / "c" / "settings.json").read_text())["seed"] == 6


def test_a_synthetic_runs_sentinels_are_the_ones_it_trained_with(run_dir):
    """Without a text tokenizer, generate takes the synthetic source's sentinels: [S_0] = 0, then
    [S_1] (starts a sequence), [S_2] (ends it), ... exactly as the training batches used them."""
    from fourm_fast.generate.cli import Assets
    from fourm_fast.train.synthetic import SyntheticSource
    from fourm_fast.train.trainer import build_model_config

    assets = Assets(run_dir)
    cfg = assets.train_config
    source = SyntheticSource(build_model_config(cfg), cfg["data"], 0)
    assert assets.sentinels and assets.sentinels == {n: [0] + ids for n, ids in source.sentinel_ids.items()}


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
    (["--target", "rgb", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["--target", "rgb", "--device", "meta"], "cpu, cuda or cuda:N"),
] + ([(["--target", "rgb", "--device", "cuda"], "no CUDA device is available")] if not torch.cuda.is_available() else []))
def test_generate_bad_requests(run_dir, tmp_path, capsys, extra, message):
    assert main(["generate", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("fourm-fast generate: error: ") and err.split(": ", 2)[2][:1] not in "'\""


def test_a_reused_out_folder_keeps_a_condition_taken_from_it(run_dir, tmp_path):
    # chaining runs through one --out: the first run's tokens are the second's condition
    run = lambda *extra: main(["generate", "--checkpoint", str(run_dir), "--steps", "1", "--batch", "1",  # noqa: E731
                               "--out", str(tmp_path / "o"), *extra])
    assert run("--target", "rgb") == 0
    rgb = (tmp_path / "o" / "tokens" / "rgb.npy").read_bytes()
    assert run("--cond", f"rgb={tmp_path / 'o' / 'tokens' / 'rgb.npy'}", "--target", "depth") == 0
    assert (tmp_path / "o" / "tokens" / "rgb.npy").read_bytes() == rgb
    assert (tmp_path / "o" / "tokens" / "depth.npy").exists()


def test_explicit_defaults_write_the_same_settings(run_dir, tmp_path):
    # "--top-k 0" was parsed as 0.0 while the default stayed 0: settings.json differed by a byte
    run = lambda out, *extra: main(["generate", "--checkpoint", str(run_dir), "--target", "depth", "--steps", "1",  # noqa: E731
                                    "--batch", "1", "--out", str(tmp_path / out), *extra])
    assert run("a") == 0 and run("b", "--top-k", "0") == 0 and run("c", "--top-k", "0.5") == 0
    assert (tmp_path / "a" / "settings.json").read_bytes() == (tmp_path / "b" / "settings.json").read_bytes()
    assert json.loads((tmp_path / "c" / "settings.json").read_text())["targets"][0]["top_k"] == 0.5


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--target", "rgb", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_generate_nonexistent_checkpoint(tmp_path, capsys):
    # used to say "model.safetensors is missing", as if the folder existed
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--target", "rgb", "--out", str(tmp_path / "x")]) == 2
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_generate_unwritable_out_fails_before_generating(run_dir, tmp_path, capsys, monkeypatch):
    from fourm_fast.generate.cli import Generator

    calls = []
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **k: calls.append(1))
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):  # was a traceback, after the whole run
        assert main(["generate", "--checkpoint", str(run_dir), "--target", "depth", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fourm-fast generate: error: --out {out}: cannot create the output folder")
        assert err.count("\n") == 1  # one line, no traceback
    assert calls == []


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory):
    """A run trained on tokenized shards: its caption tokens and sentinels are text.json's."""
    from fourm_fast.data import write_synthetic
    from fourm_fast.tokenizers.vq import tokenize_shards, train_text_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root / "data", 12, size=16, seed=2, progress=False)
    train_tokenizer(root / "data", "depth", steps=1, batch_size=4, num_codes=32, log=lambda m: None)
    train_text_tokenizer(root / "data", log=lambda m: None)
    tokenize_shards(root / "data", log=lambda m: None)
    train(load_config(None, ["data.source=shards", f"data.path={root / 'data'}", "modalities=auto",
                             "data.num_input_tokens=8", "data.num_target_tokens=8", "train.steps=1",
                             "model.overrides={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}",
                             "train.batch_size=4", "log.tensorboard=false", "log.progress=false", f"out={root / 'run'}"]),
          log=lambda m: None)
    return root


def test_a_shards_run_without_its_text_tokenizer_raises(shards_run, tmp_path, capsys):
    import shutil

    args = ["generate", "--checkpoint", str(shards_run / "run"), "--target", "caption", "--batch", "1"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    no_text = tmp_path / "tok"
    shutil.copytree(shards_run / "data" / "tokenizers", no_text)
    (no_text / "text.json").unlink()
    capsys.readouterr()
    # used to fall back on the synthetic source's sentinel ids, which this model never saw
    assert main([*args, "--tokenizers", str(no_text), "--out", str(tmp_path / "bad")]) == 2
    assert f"{no_text / 'text.json'} does not exist: checkpoint" in capsys.readouterr().err
    # images need no sentinel: they still generate without text.json
    images = ["generate", "--checkpoint", str(shards_run / "run"), "--target", "depth", "--steps", "1", "--batch", "1"]
    assert main([*images, "--tokenizers", str(no_text), "--out", str(tmp_path / "img")]) == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def rgb_tokenizer(tmp_path_factory):
    """A VQ tokenizer for the run's 4 x 4 rgb grid (32 px), trained for two steps: enough to encode."""
    from fourm_fast.data import write_synthetic
    from fourm_fast.tokenizers.vq import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    write_synthetic(root / "shards", 12, size=32, progress=False)
    train_tokenizer(root / "shards", "rgb", steps=2, batch_size=4, num_codes=64, out=root / "tokenizers" / "rgb.safetensors",
                    log=lambda m: None)
    return root / "tokenizers"


def _cond(run_dir, tmp_path, cond, *extra):
    return main(["generate", "--checkpoint", str(run_dir), "--cond", cond, "--target", "depth", "--steps", "1",
                 "--batch", "2", "--out", str(tmp_path / "o"), *extra])


def test_image_conditions_in_other_modes_encode_as_rgb(run_dir, rgb_tokenizer, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 255, np.uint8)])).save(tmp_path / "rgba.png")
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "grey3.png")
    for name in ("rgb", "rgba", "grey", "grey3"):
        assert _cond(run_dir, tmp_path / name, f"rgb={tmp_path / name}.png", "--tokenizers", str(rgb_tokenizer)) == 0, \
            capsys.readouterr().err
    given = lambda name: json.loads((tmp_path / name / "o" / "settings.json").read_text())["conditions"]  # noqa: E731
    assert given("rgba")["rgb"].endswith("rgba.png")
    # an opaque alpha channel drops out; a greyscale picture encodes as its RGB replica
    assert (tmp_path / "rgb" / "o" / "tokens" / "depth.npy").read_bytes() == (tmp_path / "rgba" / "o" / "tokens" / "depth.npy").read_bytes()
    assert (tmp_path / "grey" / "o" / "tokens" / "depth.npy").read_bytes() == (tmp_path / "grey3" / "o" / "tokens" / "depth.npy").read_bytes()


def test_condition_files_of_the_wrong_size_or_kind_raise(run_dir, rgb_tokenizer, tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "notes.png").write_text("not an image")
    np.save(tmp_path / "grid8.npy", np.zeros((8, 8), np.int64))
    np.save(tmp_path / "float.npy", np.full((4, 4), 3.7))
    np.save(tmp_path / "per_sample.npy", np.zeros((3, 4, 4), np.int64))  # 3 grids for a batch of 2
    cases = [(f"rgb={tmp_path / 'big.png'}", "the image is 64 x 64 px; the rgb tokenizer takes 32 x 32"),
             (f"rgb={tmp_path / 'notes.png'}", "not a readable image"),
             # 64 ids used to be cut into a 16-id strip per sample (4 samples' worth) without a word
             (f"rgb={tmp_path / 'grid8.npy'}", "rgb: tokens must be (B, 16) or (B, 4, 4) with B = 2"),
             (f"rgb={tmp_path / 'float.npy'}", "token ids must be integers, got float64"),
             (f"rgb={tmp_path / 'per_sample.npy'}", "got shape (3, 4, 4)")]
    for cond, message in cases:
        assert _cond(run_dir, tmp_path, cond, "--tokenizers", str(rgb_tokenizer)) == 2
        assert message in capsys.readouterr().err, cond
    np.save(tmp_path / "two.npy", np.stack([np.zeros((4, 4), np.int64), np.ones((4, 4), np.int64)]))
    assert _cond(run_dir, tmp_path, f"rgb={tmp_path / 'two.npy'}") == 0  # one grid per sample


@pytest.mark.parametrize("extra,message", [
    (["--cond", "rgb=a.npy", "--cond", "rgb=b.npy"], "--cond rgb: given twice"),
    (["--target", "depth,depth"], "targets ['depth'] appear more than once"),
    (["--cond", "depth=x.npy", "--target", "depth"], "['depth'] are both conditions and targets"),
    (["--target", "rgb", "--top-p", "90"], "top_p must be in [0, 1]"),
])
def test_generate_refuses_requests_it_would_not_honour(run_dir, tmp_path, capsys, extra, message):
    for f in ("a.npy", "b.npy", "x.npy"):
        np.save(tmp_path / f, np.zeros((4, 4), np.int64))
    args = ["generate", "--checkpoint", str(run_dir), "--out", str(tmp_path / "o")]
    args += [a.replace("=", f"={tmp_path}/") if a.endswith(".npy") else a for a in extra]
    if "--target" not in extra:
        args += ["--target", "depth"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
