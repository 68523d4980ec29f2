"""VQ image tokenizer: trains on shards, measures itself, tokenizes the shards, clear errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fourm_fast.data import ShardError, write_synthetic
from fourm_fast.data.shards import read_manifest
from fourm_fast.tokenizers.vq import VQConfig, VQTokenizer, load_images, to_input, tokenize_shards, train_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, 30, size=32, seed=1, progress=False)
    return root


def test_train_tokenize_and_round_trip(shards):
    # Quality on the held-out tenth (samples 27-29) against what knows nothing: the majority class
    # for semseg (75.5% of its pixels are background), the held-out mean for depth (12.7 dB). Here
    # the tokenizers reach 81.1% and 16.4 dB; a reviewer's seeds 0-3 gave semseg 80.9-84.2%, and
    # depth at 100 steps 15.1-17.3 dB (at 40 steps one seed fell to 13.0 dB).
    manifest = read_manifest(shards)
    res = train_tokenizer(shards, "semseg", steps=60, batch_size=8, num_codes=64, log=lambda m: None)
    assert (res["train_samples"], res["eval_samples"]) == (27, 3)  # 0-26 train, 27-29 held out
    classes = load_images(shards, "semseg", [27, 28, 29], manifest).argmax(1)
    majority = float((classes == classes.flatten().mode().values).float().mean())
    assert res["quality"]["pixel_accuracy"] > majority + 0.03
    res2 = train_tokenizer(shards, "depth", steps=100, batch_size=8, num_codes=64, log=lambda m: None)
    depth = load_images(shards, "depth", [27, 28, 29], manifest).clamp(-1, 1)
    constant_db = 10 * math.log10(4.0 / float(((depth - depth.mean()) ** 2).mean()))
    assert np.isfinite(res2["quality"]["psnr_db"]) and res2["quality"]["psnr_db"] > constant_db + 1.5
    model, meta = VQTokenizer.load(shards / "tokenizers" / "depth.safetensors")
    assert meta["quality"] == res2["quality"] and meta["config"]["modality"] == "depth"
    done = tokenize_shards(shards, log=lambda m: None)
    assert set(done) == {"semseg", "depth"}
    grid = np.load(shards / "tokens" / "depth.npy")
    assert grid.shape == (30, 4, 4) and grid.dtype == np.int16 and 0 <= grid.min() and grid.max() < 64
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokens"]["depth"]["version"] == 1
    # generate --cond depth=PICTURE reads a shard's PNG (millimetres) into the tokens tokenize wrote
    from fourm_fast.generate.cli import Assets

    assets = Assets.__new__(Assets)  # only its tokenizers: no checkpoint needed for this
    assets.vq = {"depth": model}
    for i in (5, 17):
        picture = shards / "depth" / f"{i:06d}.{manifest['extensions']['depth']}"
        assert assets.image_tokens("depth", str(picture)).reshape(4, 4).tolist() == grid[i].tolist()
    assert len(np.unique(grid[5])) > 1 and not np.array_equal(grid[5], grid[17])  # the check has power
    import hashlib

    entry = manifest["tokens"]["depth"]
    assert entry["sha256"] == {"depth.npy": hashlib.sha256((shards / "tokens" / "depth.npy").read_bytes()).hexdigest()}
    assert entry["tokenizer_sha256"] == hashlib.sha256((shards / "tokenizers" / "depth.safetensors").read_bytes()).hexdigest()
    # an edited row that stays in range is caught by the checksum
    from fourm_fast.data import ShardError
    from fourm_fast.data.validate import load_tokens

    assert load_tokens(shards, manifest, ["depth"]).arrays["depth"].shape == (30, 4, 4)
    edited = grid.copy()
    edited[3, 0, 0] = (edited[3, 0, 0] + 1) % 64
    saved = (shards / "tokens" / "depth.npy").read_bytes()
    np.save(shards / "tokens" / "depth.npy", edited)
    try:
        with pytest.raises(ShardError, match="depth.npy: SHA-256 differs from the manifest's"):
            load_tokens(shards, manifest, ["depth"])
    finally:
        (shards / "tokens" / "depth.npy").write_bytes(saved)
    from fourm_fast.data import read_sample

    x = to_input("depth", read_sample(shards, 7, modalities=["depth"])["depth"])[None]
    tokens = model.encode(x)
    assert tokens.dtype == torch.int16 and torch.equal(tokens[0], torch.from_numpy(grid[7]))
    assert model.decode(tokens).shape == (1, 1, 32, 32)


def test_errors_name_the_problem(shards, tmp_path):
    with pytest.raises(ValueError, match="no modality 'sound'"):
        train_tokenizer(shards, "sound", steps=1)
    with pytest.raises(ValueError, match="no VQ tokenizer for modality 'caption'"):
        VQTokenizer(VQConfig("caption"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQTokenizer.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable fourm_fast VQ tokenizer"):
        VQTokenizer.load(tmp_path / "junk.safetensors")
    for bad in (40000, 32769, 0):
        with pytest.raises(ValueError, match="num_codes must be in 1..32768"):  # grids are int16
            VQConfig("depth", num_codes=bad)
    VQConfig("depth", num_codes=32768)  # id 32767 still fits
    write_synthetic(tmp_path / "few", 12, size=16, progress=False)
    with pytest.raises(ValueError, match="no tokenizers"):
        tokenize_shards(tmp_path / "few", log=lambda m: None)


def test_tokens_of_a_retrained_tokenizer_are_refused(tmp_path):
    # Retraining a tokenizer after tokenize paired the stored ids with another codebook (or, for
    # text, another WordPiece vocabulary: its training is not reproducible) without a word.
    from fourm_fast.data import ShardError, TokenShards
    from fourm_fast.tokenizers.vq import train_text_tokenizer

    root = tmp_path / "shards"
    write_synthetic(root, 12, size=16, seed=2, progress=False)
    quiet = dict(log=lambda m: None)
    train_tokenizer(root, "depth", steps=2, batch_size=4, num_codes=16, **quiet)
    train_text_tokenizer(root, **quiet)
    tokenize_shards(root, **quiet)
    assert len(TokenShards(root, ["depth", "caption"])) == 12
    train_tokenizer(root, "depth", steps=2, batch_size=4, num_codes=32, **quiet)
    with pytest.raises(ShardError, match=r"tokens/depth.npy: made by another depth.safetensors than .* holds now "
                                         r"\(retrained after fourm-fast tokenize\); run fourm-fast tokenize"):
        TokenShards(root, ["depth"])
    assert len(TokenShards(root, ["caption"])) == 12  # the other modality's tokens are still good
    tokenize_shards(root, **quiet)
    assert len(TokenShards(root, ["depth", "caption"])) == 12
    text = root / "tokenizers" / "text.json"
    text.write_text(text.read_text() + " ")
    with pytest.raises(ShardError, match="made by another text.json"):
        TokenShards(root, ["caption"])


def test_bad_class_ids_and_text_encodings_name_the_file(tmp_path):
    # both used to surface as tracebacks without a path (a one_hot RuntimeError, a UnicodeDecodeError)
    import hashlib

    from PIL import Image

    from fourm_fast.data import ShardError
    from fourm_fast.tokenizers.vq import train_text_tokenizer

    root = tmp_path / "shards"
    write_synthetic(root, 12, size=16, seed=3, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())

    def replace(rel: str, data: bytes) -> None:
        (root / rel).write_bytes(data)
        manifest["checksums"][rel] = hashlib.sha256(data).hexdigest()  # a valid shard, bad content
        (root / "manifest.json").write_text(json.dumps(manifest))

    seg = f"semseg/000003.{manifest['extensions']['semseg']}"
    arr = np.array(Image.open(root / seg))
    arr[0, 0] = 4
    (root / "tmp.png").unlink(missing_ok=True)
    Image.fromarray(arr).save(root / "tmp.png")
    replace(seg, (root / "tmp.png").read_bytes())
    with pytest.raises(ShardError, match="semseg/000003.png: class id 4, the semseg tokenizer knows 4 classes"):
        train_tokenizer(root, "semseg", steps=1, batch_size=2, num_codes=8, log=lambda m: None)
    cap = f"caption/000002.{manifest['extensions']['caption']}"
    replace(cap, "café".encode("latin-1"))
    with pytest.raises(ShardError, match="caption/000002.txt: not UTF-8 text"):
        train_text_tokenizer(root, log=lambda m: None)


def test_diverged_training_saves_nothing(shards, tmp_path, monkeypatch):
    loss, calls = VQTokenizer.loss, [0]

    def nan_at_step_3(self, batch):
        calls[0] += 1
        out, extra = loss(self, batch)
        return (out * float("nan") if calls[0] == 3 else out), extra

    monkeypatch.setattr(VQTokenizer, "loss", nan_at_step_3)
    out = tmp_path / "depth.safetensors"
    with pytest.raises(ValueError, match=r"tokenizer depth: training diverged \(loss nan at step 3 of 5, lr 0.002\); nothing was saved"):
        train_tokenizer(shards, "depth", steps=5, batch_size=4, num_codes=16, out=out, log=lambda m: None)
    assert not out.exists()
    # a NaN step whose loss still read finite (here: the last step's gradients) is caught before saving
    monkeypatch.setattr(VQTokenizer, "loss", loss)
    step = torch.optim.AdamW.step

    def poison_last(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3 + 5:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poison_last)
    with pytest.raises(ValueError, match=r"tokenizer depth: training diverged \(NaN or inf in encoder"):
        train_tokenizer(shards, "depth", steps=5, batch_size=4, num_codes=16, out=out, log=lambda m: None)
    assert not out.exists()


def test_cli(shards, tmp_path, capfd):
    out = tmp_path / "edges.safetensors"
    res = subprocess.run([sys.executable, "-m", "fourm_fast", "tokenizer", "train", "--data", str(shards), "--modality",
                          "edges", "--steps", "5", "--batch-size", "4", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.exists() and "held-out" in res.stderr
    bad = subprocess.run([sys.executable, "-m", "fourm_fast", "tokenize", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "manifest.json is missing" in bad.stderr
    from fourm_fast.cli import main

    text = tmp_path / "own_text.json"  # --out was ignored for text: DATA/tokenizers/text.json was overwritten
    assert main(["tokenizer", "train", "--data", str(shards), "--modality", "text", "--out", str(text)]) == 0
    assert text.exists() and not (shards / "tokenizers" / "text.json").exists()
    assert main(["tokenizer", "train", "--data", str(shards), "--modality", "text", "--num-codes", "99"]) == 2
    assert "--num-codes: VQ tokenizer settings; the text tokenizer takes --out only" in capfd.readouterr().err
    assert main(["tokenizer", "train", "--data", str(shards), "--modality", "depth", "--batch-size", "0"]) == 2
    assert "batch_size must be an integer >= 1, got 0" in capfd.readouterr().err


def test_tokenize_refuses_a_tokenizer_of_another_image_size(tmp_path):
    # data synth --size 32, tokenizer train, data synth --size 16 into the same folder: tokenize
    # used to write 2 x 2 grids from the 32 px tokenizer without a word
    root = tmp_path / "shards"
    write_synthetic(root, 12, size=32, seed=0, progress=False)
    train_tokenizer(root, "depth", steps=1, batch_size=2, num_codes=8, log=lambda m: None)
    write_synthetic(root, 12, size=16, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"depth.safetensors: the depth tokenizer takes 32 x 32 px images, "
                                         r"the images in .* are 16 x 16"):
        tokenize_shards(root, log=lambda m: None)
    assert not (root / "tokens").exists()


def test_tokenize_refuses_two_tokenizers_for_one_modality(tmp_path):
    root = tmp_path / "shards"
    write_synthetic(root, 12, size=16, seed=0, progress=False)
    quiet = dict(steps=1, batch_size=2, num_codes=8, log=lambda m: None)
    train_tokenizer(root, "depth", **quiet)
    train_tokenizer(root, "depth", out=root / "tokenizers" / "depth_v2.safetensors", **quiet)
    with pytest.raises(ValueError, match="two depth tokenizers, depth.safetensors and depth_v2.safetensors"):
        tokenize_shards(root, log=lambda m: None)  # the last in sort order used to win silently
    assert not (root / "tokens").exists()


def test_text_tokenizer_refuses_shards_without_texts(tmp_path):
    from fourm_fast.tokenizers.vq import train_text_tokenizer

    root = tmp_path / "shards"
    write_synthetic(root, 12, size=16, seed=0, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["modalities"] = ["rgb", "depth"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "text.json"
    with pytest.raises(ValueError, match=r"no texts .* caption and det .* \['rgb', 'depth'\]"):
        train_text_tokenizer(root, out=out, log=lambda m: None)  # used to save a tokenizer with no learned words
    assert not out.exists()
    manifest["modalities"] = "rgb"  # a string: "rgb" in "rgb" held, "caption" in "rgb" did not
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="modalities"):
        train_text_tokenizer(root, out=out, log=lambda m: None)
    with pytest.raises(ShardError, match="modalities"):
        train_tokenizer(root, "rgb", steps=1, batch_size=2, num_codes=8, out=tmp_path / "rgb.safetensors",
                        log=lambda m: None)


def test_unwritable_out_is_refused_before_training(shards, tmp_path, capfd):
    from fourm_fast.cli import main
    from fourm_fast.tokenizers.vq import train_text_tokenizer

    (tmp_path / "a_file").write_text("x")
    for out, match in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "t.out", "a_file is a file, not a directory")):
        logs = []
        with pytest.raises(ValueError, match=match):
            train_tokenizer(shards, "depth", steps=1, batch_size=2, num_codes=8, out=out, log=logs.append)
        with pytest.raises(ValueError, match=match):
            train_text_tokenizer(shards, out=out, log=logs.append)
        assert logs == []  # refused before any training step
    # the CLI: one line, not a SafetensorError traceback or a bare "Exception: Is a directory"
    for modality in ("rgb", "text"):
        args = ["--steps", "1", "--batch-size", "2"] if modality == "rgb" else []
        assert main(["tokenizer", "train", "--data", str(shards), "--modality", modality, "--out", str(tmp_path), *args]) == 2
        err = capfd.readouterr().err
        assert f"fourm-fast tokenizer train: error: {tmp_path} is a directory" in err and "Traceback" not in err
