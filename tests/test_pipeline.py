"""Shards -> tokenizers -> tokens -> loader -> training, and the demo end to end (small)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fourm_fast.data import ShardError, write_synthetic
from fourm_fast.data.loader import TokenShards, build_loader
from fourm_fast.tokenizers.vq import tokenize_shards, train_text_tokenizer, train_tokenizer
from fourm_fast.train.config import load_config
from fourm_fast.train.trainer import train


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_synthetic(root, 24, size=16, seed=2, progress=False)
    train_tokenizer(root, "depth", steps=3, batch_size=4, num_codes=32, log=lambda m: None)
    train_tokenizer(root, "semseg", steps=3, batch_size=4, num_codes=32, log=lambda m: None)
    train_text_tokenizer(root, log=lambda m: None)
    tokenize_shards(root, log=lambda m: None)
    return root


def test_token_shards_and_loader(tokenized):
    ds = TokenShards(tokenized)
    assert set(ds.kinds) == {"depth", "semseg", "caption", "det"}
    tokens, lengths = ds[3]
    assert tokens["depth"].shape == (4,) and lengths["caption"] >= 2
    for backend in ("torch", "dali"):
        batch = next(iter(build_loader(tokenized, 8, backend=backend, num_workers=0)))
        assert batch["tokens"]["depth"].shape == (8, 2, 2) and batch["images"]["rgb"].shape == (8, 3, 16, 16)
        assert torch.equal(batch["tokens"]["depth"].flatten(1), ds.batch(batch["index"].numpy())[0]["depth"])


def test_token_shards_name_bad_files(tokenized, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tokenized, bad)
    np.save(bad / "tokens" / "depth.npy", np.zeros((24, 3, 3), np.int16))
    with pytest.raises(ShardError, match="tokens/depth.npy: SHA-256 differs"):  # tokenize recorded it
        TokenShards(bad)
    # manifests from before tokenize recorded checksums: the shape and dtype checks still name the file
    import json

    manifest = json.loads((bad / "manifest.json").read_text())
    for entry in manifest["tokens"].values():
        entry.pop("sha256")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="tokens/depth.npy: shape"):
        TokenShards(bad)
    np.save(bad / "tokens" / "depth.npy", np.zeros((24, 2, 2), np.int64))
    with pytest.raises(ShardError, match="tokens/depth.npy: dtype int64"):
        TokenShards(bad)
    with pytest.raises(ShardError, match="no tokens for \\['rgb'\\]"):
        TokenShards(tokenized, ["rgb"])


def test_training_from_token_shards(tokenized, tmp_path):
    cfg = load_config(None, ["data.source=shards", f"data.path={tokenized}", "modalities=auto",
                             "data.num_input_tokens=8", "data.num_target_tokens=8",
                             "model.overrides={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}",
                             "train.steps=2", "train.batch_size=4", "log.tensorboard=false", "log.progress=false",
                             f"out={tmp_path}"])
    res = train(cfg, log=lambda m: None)
    assert res["steps"] == 2 and np.isfinite(res["last"]["loss"])


def _shard_cfg(path, out, *extra):
    return load_config(None, ["data.source=shards", f"data.path={path}", "modalities=auto", "data.num_input_tokens=8",
                              "data.num_target_tokens=8", "model.overrides={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}",
                              "train.steps=1", "train.batch_size=4", "log.tensorboard=false", "log.progress=false",
                              f"out={out}", *extra])


def test_shard_training_checks_sentinels_and_reports_cut_text(tokenized, tmp_path):
    import shutil

    lines = []
    train(_shard_cfg(tokenized, tmp_path / "a", "data.max_text_tokens=3"), log=lines.append)
    assert any("caption rows are longer than 3 tokens and are cut" in ln for ln in lines), lines
    lines.clear()
    train(_shard_cfg(tokenized, tmp_path / "b"), log=lines.append)
    assert not any("are cut" in ln for ln in lines), lines
    from fourm_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="caption: 500 tokens need 252 sentinels .* has 200"):
        train(_shard_cfg(tokenized, tmp_path / "c", "data.max_text_tokens=500"), log=lambda m: None)
    bare = tmp_path / "bare"
    shutil.copytree(tokenized, bare)
    (bare / "tokenizers" / "text.json").unlink()
    with pytest.raises(ShardError, match="text.json does not exist: the span masking of caption needs"):
        train(_shard_cfg(bare, tmp_path / "d"), log=lambda m: None)


def test_generation_refuses_tokenizers_retrained_after_training(tokenized, tmp_path, capsys):
    # generate decodes with the training data's tokenizers: a codebook retrained since would turn
    # the model's tokens into other pictures without a word
    import shutil

    from fourm_fast.cli import main

    data = tmp_path / "data"
    shutil.copytree(tokenized, data)
    train(_shard_cfg(data, tmp_path / "run"), log=lambda m: None)
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--target", "depth", "--steps", "1", "--batch", "1"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    train_tokenizer(data, "depth", steps=1, batch_size=4, num_codes=32, seed=5, log=lambda m: None)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "stale")]) == 2
    err = capsys.readouterr().err
    assert "depth.safetensors changed since the checkpoint" in err and "trained on depth tokens made with it" in err
    tokenize_shards(data, log=lambda m: None)  # fresh tokens do not make the model's old ones decodable
    assert main([*args, "--out", str(tmp_path / "stale2")]) == 2
    assert "depth.safetensors changed since the checkpoint" in capsys.readouterr().err


def test_demo_end_to_end_small(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fourm_fast.demo", "--out", str(tmp_path / "demo"), "--scenes", "20",
                          "--size", "16", "--tokenizer-steps", "2", "--train-steps", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["stages"]) == {"synth", "tokenizers", "tokenize", "train", "generate"}
    assert summary["stages"]["train"]["steps"] == 2
    from PIL import Image
    grid = Image.open(tmp_path / "demo" / "samples.png")  # three rows: one per condition set
    assert len(summary["stages"]["generate"]["rows"]) == 3 and grid.size[1] == 3 * 146
    # `fourm-fast generate` on the demo's run: the caption goes through the trained text tokenizer,
    # the targets come out through the VQ tokenizers, and a rerun writes the same bytes
    from fourm_fast.cli import main
    from fourm_fast.generate.cli import Assets

    run = tmp_path / "demo" / "train"
    assets = Assets(run)
    assert {"rgb", "depth"} <= set(assets.vq) and assets.text is not None  # pictures decode through them
    args = ["generate", "--checkpoint", str(run), "--cond", "caption=a red circle", "--target", "rgb,depth",
            "--steps", "2", "--cfg", "2", "--batch", "2", "--seed", "3"]
    for out in ("g1", "g2"):
        assert main(args + ["--out", str(tmp_path / out)]) == 0
    for name in ("samples.png", "text.json", "settings.json", "tokens/rgb.npy", "tokens/depth.npy"):
        assert (tmp_path / "g1" / name).read_bytes() == (tmp_path / "g2" / name).read_bytes(), name
    assert json.loads((tmp_path / "g1" / "text.json").read_text())["caption"] == ["a red circle"] * 2
    assert Image.open(tmp_path / "g1" / "samples.png").size == (3 * 132, 2 * 146)  # caption, rgb, depth x 2 samples
    assert json.loads((tmp_path / "g1" / "settings.json").read_text())["conditions"] == {"caption": "a red circle"}
