"""The shard loaders: DALI pipeline and PIL/torch baseline, aligned crop/flip, seeds, bad data, arguments."""
import argparse
import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fourm_fast.data import ShardError, TokenShards, build_loader, read_sample, write_synthetic
from fourm_fast.data.shards import FORMAT
from fourm_fast.train import add_arguments, overrides_from_args
from fourm_fast.train.config import ConfigError, load_config

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["dali", "torch"]
N, SIZE = 12, 32


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rewrite(root: Path, rel: str, data: bytes, update_checksum: bool) -> None:
    (root / rel).write_bytes(data)
    if update_checksum:
        path = root / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["checksums"][rel] = hashlib.sha256(data).hexdigest()
        path.write_text(json.dumps(manifest))


def _add_tokens(root: Path, n: int, seed: int = 0) -> None:
    """Token arrays in the format fourm-fast tokenize writes (without training tokenizers), and a
    word-level text tokenizer holding 4M's specials and 40 sentinels (ids 4..43) for span masking."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[SOS]", "[EOS]"] + [f"[S_{i}]" for i in range(40)])}
    (root / "tokenizers").mkdir(exist_ok=True)
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(root / "tokenizers" / "text.json"))
    rng = np.random.default_rng(seed)
    (root / "tokens").mkdir(exist_ok=True)
    grids = rng.integers(0, 64, (n, 4, 4)).astype(np.int16)
    lengths = rng.integers(1, 7, n).astype(np.int32)
    ids = np.zeros((n, 6), np.int32)
    for i, l in enumerate(lengths):
        ids[i, :l] = rng.integers(50, 100, l)
    np.save(root / "tokens" / "depth.npy", grids)
    np.save(root / "tokens" / "caption.npy", ids)
    np.save(root / "tokens" / "caption.lengths.npy", lengths)
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokens"] = {"depth": {"tokenizer": "fake", "version": 1, "shape": [n, 4, 4], "num_codes": 64},
                          "caption": {"tokenizer": "fake", "version": 1, "shape": [n, 6], "num_codes": 100,
                                      "num_sentinels": 40}}
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, N, size=SIZE, seed=5, progress=False)
    _add_tokens(root, N)
    return root


@pytest.fixture(scope="module")
def coords(tmp_path_factory):
    """Shards whose every pixel spells out where it came from: rgb = (x, y, sample), depth = the
    millimetre code sample * S^2 + y * S + x, normal channel 0 = x, semseg = x, edges = y."""
    root = tmp_path_factory.mktemp("coords")
    n, s = 10, 24
    y, x = np.mgrid[0:s, 0:s].astype(np.int64)
    checksums = {}
    exts = {m: "png" for m in ("rgb", "depth", "normal", "semseg", "edges")}
    for i in range(n):
        images = {"rgb": np.stack([x, y, np.full_like(x, i)], -1).astype(np.uint8),
                  "depth": (i * s * s + y * s + x).astype(np.uint16),
                  "normal": np.stack([x, 255 - y, np.full_like(x, 7)], -1).astype(np.uint8),
                  "semseg": x.astype(np.uint8), "edges": y.astype(np.uint8)}
        for m, arr in images.items():
            rel = f"{m}/{i:06d}.png"
            (root / m).mkdir(exist_ok=True)
            data = _png(arr)
            (root / rel).write_bytes(data)
            checksums[rel] = hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "modalities": list(exts), "num_samples": n,
                                                    "size": s, "seed": 0, "extensions": exts, "checksums": checksums}))
    return root


def _batches(loader, epochs=1):
    return [b for _ in range(epochs) for b in loader]


def _pairs(a: list, b: list) -> list:
    """zip, after checking that both runs gave the same, non-zero number of batches (a bare zip
    would pass an empty run)."""
    assert len(a) == len(b) > 0, (len(a), len(b))
    return list(zip(a, b))


def _rgb_resaved(synth: Path, root: Path, fmt: str, checksums: bool = True, **save_kw) -> Path:
    """A copy of the shards with every rgb image saved again by PIL in fmt (save_kw: quality, exif,
    icc_profile ...), the manifest's extension and checksums (or none, checksums=False) to match."""
    shutil.copytree(synth, root)
    manifest = json.loads((root / "manifest.json").read_text())
    ext = "png" if fmt == "PNG" else "jpg"
    for i in range(N):
        old = f"rgb/{i:06d}.png"
        buf = io.BytesIO()
        Image.open(root / old).save(buf, format=fmt, **save_kw)
        (root / old).unlink()
        del manifest["checksums"][old]
        (root / f"rgb/{i:06d}.{ext}").write_bytes(buf.getvalue())
        if checksums:
            manifest["checksums"][f"rgb/{i:06d}.{ext}"] = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest["extensions"]["rgb"] = ext
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _equal(a: dict, b: dict) -> None:
    for k in ("index", "crop", "flip"):
        assert torch.equal(a[k], b[k]), k
    for group in ("images", "tokens", "lengths"):
        assert a[group].keys() == b[group].keys()
        for m in a[group]:
            assert a[group][m].dtype == b[group][m].dtype and torch.equal(a[group][m], b[group][m]), (group, m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contents(synth, backend):
    loader = build_loader(synth, 5, backend=backend, crop=24, flip_prob=0.5, num_workers=0, drop_last=False)
    batches = _batches(loader)
    assert len(loader) == 3 and [len(b["index"]) for b in batches] == [5, 5, 2]
    b = batches[0]
    want = {"rgb": ((5, 3, 24, 24), torch.uint8), "depth": ((5, 1, 24, 24), torch.float32),
            "normal": ((5, 3, 24, 24), torch.float32), "semseg": ((5, 1, 24, 24), torch.uint8),
            "edges": ((5, 1, 24, 24), torch.uint8)}
    assert {m: (tuple(t.shape), t.dtype) for m, t in b["images"].items()} == want
    assert b["tokens"]["depth"].shape == (5, 4, 4) and b["tokens"]["depth"].dtype == torch.int64
    assert b["tokens"]["caption"].shape == (5, 6) and b["lengths"]["caption"].dtype == torch.int64
    assert b["index"].dtype == torch.int64 and b["crop"].shape == (5, 2) and b["flip"].dtype == torch.bool
    # tokens are the stored rows of the batch's samples, unchanged by the augmentation
    grids = np.load(synth / "tokens" / "depth.npy")
    lengths = np.load(synth / "tokens" / "caption.lengths.npy")
    for b in batches:
        assert np.array_equal(b["tokens"]["depth"].numpy(), grids[b["index"].numpy()])
        assert np.array_equal(b["lengths"]["caption"].numpy(), lengths[b["index"].numpy()])
    seen = torch.cat([b["index"] for b in batches]).sort().values
    assert torch.equal(seen, torch.arange(N)), "every sample once per epoch"
    assert ((b["crop"] >= 0) & (b["crop"] <= SIZE - 24)).all()


def test_dali_equals_torch_and_the_shard_reader(synth):
    kw = dict(crop=20, flip_prob=0.5, seed=7, num_workers=0)
    dali, ref = build_loader(synth, 4, backend="dali", **kw), build_loader(synth, 4, backend="torch", **kw)
    d_batches, t_batches = _batches(dali, 2), _batches(ref, 2)
    assert len(d_batches) == 6
    for a, b in _pairs(d_batches, t_batches):
        _equal(a, b)
    # and both equal read_sample (shards._decode: depth / 1000, normal / 127.5 - 1) cropped and flipped
    b = d_batches[0]
    for k, i in enumerate(b["index"].tolist()):
        y0, x0 = b["crop"][k].tolist()
        sample = read_sample(synth, i)
        for m, out in b["images"].items():
            arr = sample[m] if sample[m].ndim == 3 else sample[m][..., None]
            arr = arr[y0:y0 + 20, x0:x0 + 20]
            if b["flip"][k]:
                arr = arr[:, ::-1]
                if m == "normal":  # a mirror negates the x component
                    arr = arr * np.array([-1, 1, 1], np.float32)
            assert np.array_equal(out[k].numpy(), arr.transpose(2, 0, 1)), (m, i)


def test_seeds_epochs_and_resume(synth):
    kw = dict(crop=16, flip_prob=0.5, num_workers=1)
    a, b, c = (build_loader(synth, 4, backend="dali", seed=s, **kw) for s in (3, 3, 4))
    ea, eb, ec = _batches(a, 2), _batches(b, 2), _batches(c, 1)
    for x, y in _pairs(ea, eb):
        _equal(x, y)
    assert not torch.equal(ea[0]["images"]["rgb"], ec[0]["images"]["rgb"]), "another seed, other batches"
    first, second = torch.cat([x["index"] for x in ea[:3]]), torch.cat([x["index"] for x in ea[3:]])
    assert not torch.equal(first, second), "each epoch reshuffles"
    assert not torch.equal(torch.cat([x["crop"] for x in ea[:3]]), torch.cat([x["crop"] for x in ea[3:]]))
    # set_epoch resumes exactly; an epoch broken off early does not leak into the next one
    d = build_loader(synth, 4, backend="dali", seed=3, **kw)
    d.set_epoch(1)
    for x, y in _pairs(_batches(d), ea[3:]):
        _equal(x, y)
    e = build_loader(synth, 4, backend="dali", seed=3, **kw)
    next(iter(e))
    for x, y in _pairs(_batches(e), ea[3:]):
        _equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workers", [0, 2])
def test_overlapping_iterations_raise(synth, backend, workers):
    # a second pass started before the first ended would take over its batches (the torch backend's
    # persistent DataLoader iterator is reset by it): the first pass raises instead
    loader = build_loader(synth, 4, backend=backend, seed=3, num_workers=workers)
    straight = _batches(build_loader(synth, 4, backend=backend, seed=3, num_workers=workers), 2)
    first = iter(loader)
    _equal(next(first), straight[0])
    second = iter(loader)
    for x, y in _pairs(list(second), straight[3:]):  # the next epoch, whole
        _equal(x, y)
    with pytest.raises(RuntimeError, match="another iteration over this .*Loader started"):
        next(first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_flip_are_the_same_for_every_modality(coords, backend):
    """Decode each output pixel's source (x, y) from every modality: they must all name the pixel
    (y0 + r, x0 + c) or, flipped, (y0 + r, x0 + crop - 1 - c) of the same sample."""
    crop, s = 17, 24
    loader = build_loader(coords, 5, backend=backend, crop=crop, flip_prob=0.5, seed=1, num_workers=0)
    flips, corners = [], set()
    for b in _batches(loader, 3):
        for k, i in enumerate(b["index"].tolist()):
            y0, x0 = b["crop"][k].tolist()
            flip = bool(b["flip"][k])
            flips.append(flip)
            corners.add((y0, x0))
            r, c = np.mgrid[0:crop, 0:crop]
            want_y = y0 + r
            want_x = x0 + (crop - 1 - c if flip else c)
            im = {m: t[k].numpy() for m, t in b["images"].items()}
            assert np.array_equal(im["rgb"][0], want_x) and np.array_equal(im["rgb"][1], want_y)
            assert (im["rgb"][2] == i).all()
            mm = np.rint(im["depth"][0].astype(np.float64) * 1000).astype(np.int64)
            assert np.array_equal(mm, i * s * s + want_y * s + want_x)
            assert np.array_equal(im["depth"][0], (mm.astype(np.float32) / 1000.0)), "depth as shards._decode"
            # a mirror negates the normals' x component: stored value v reads as 255 - v
            assert np.array_equal(np.rint((im["normal"][0] + 1) * 127.5), 255 - want_x if flip else want_x)
            assert np.array_equal(im["semseg"][0], want_x) and np.array_equal(im["edges"][0], want_y)
    assert 0.2 < np.mean(flips) < 0.8, "flips happen for some samples and not for others"
    assert len(corners) > 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_normals_describe_the_mirrored_scene(synth, backend):
    # The synthetic world rendered with every object mirrored (cx -> 1 - cx) is what a flipped
    # sample shows: its normals' x components must point the same way. Flipping the stored map
    # alone left all of them pointing the other way (both backends agreed, wrongly).
    import dataclasses

    from fourm_fast.data import render, sample_scene
    from fourm_fast.data.shards import read_manifest

    seed = read_manifest(synth)["seed"]
    b = next(iter(build_loader(synth, 4, backend=backend, shuffle=False, flip_prob=1.0, num_workers=0, images=["normal"], tokens=[])))
    assert b["flip"].all()
    agree = []
    for k, i in enumerate(b["index"].tolist()):
        mirrored = render([dataclasses.replace(o, cx=1.0 - o.cx) for o in sample_scene(seed, i)], SIZE)["normal"]
        nx, want = b["images"]["normal"][k, 0].numpy(), mirrored[..., 0]
        tilted = (np.abs(nx) > 0.05) & (np.abs(want) > 0.05)
        agree.append(np.sign(nx[tilted]) == np.sign(want[tilted]))
    agree = np.concatenate(agree)
    assert agree.size > 100 and agree.mean() > 0.98, agree.mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_augmentation_gives_the_stored_images(synth, backend):
    b = next(iter(build_loader(synth, 3, backend=backend, shuffle=False, num_workers=0)))
    assert b["index"].tolist() == [0, 1, 2] and not b["flip"].any() and not b["crop"].any()
    for k in range(3):
        sample = read_sample(synth, k)
        for m, out in b["images"].items():
            arr = sample[m] if sample[m].ndim == 3 else sample[m][..., None]
            assert np.array_equal(out[k].numpy(), arr.transpose(2, 0, 1)), m


def _wrong_size(root):
    _rewrite(root, "rgb/000002.png", _png(np.zeros((24, 24, 3), np.uint8)), update_checksum=True)


def _eight_bit_depth(root):
    _rewrite(root, "depth/000008.png", _png(np.zeros((SIZE, SIZE), np.uint8)), update_checksum=True)


def _truncate(root):
    data = (root / "depth/000003.png").read_bytes()
    (root / "depth/000003.png").write_bytes(data[:len(data) // 2])


def _token_row(root):
    arr = np.load(root / "tokens/depth.npy")
    arr[5, 1, 2] = 64
    np.save(root / "tokens/depth.npy", arr)


def _length_row(root):
    arr = np.load(root / "tokens/caption.lengths.npy")
    arr[6] = 0
    np.save(root / "tokens/caption.lengths.npy", arr)


BAD_CASES = {
    "truncated": (_truncate, 3, "depth/000003.png: checksum does not match the manifest"),
    "missing": (lambda r: (r / "semseg/000004.png").unlink(), 4, "semseg/000004.png: missing"),
    "wrong_size": (_wrong_size, 2, "rgb/000002.png: 24x24 pixels, the manifest says 32x32"),
    "bit_depth": (_eight_bit_depth, 8, "depth/000008.png: 1 channel\\(s\\) of 8 bits, depth needs 1 of 16"),
    "unlisted": (lambda r: _drop_checksum(r), 9,
                 "edges/000009.png: not listed in the manifest's checksums"),
    "token_row": (_token_row, 5, "tokens/depth.npy: row 5: token ids outside \\[0, 64\\)"),
    "length_row": (_length_row, 6, "tokens/caption.lengths.npy: row 6: length 0 outside \\[1, 6\\]"),
}


def _drop_checksum(root):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["checksums"]["edges/000009.png"]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sample_raises_naming_the_file_or_is_skipped_and_counted(synth, tmp_path, case, backend):
    breaker, index, message = BAD_CASES[case]
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    breaker(root)
    with pytest.raises(ShardError, match=message):
        build_loader(root, 4, backend=backend, num_workers=0)
    lines = []
    loader = build_loader(root, 4, backend=backend, num_workers=0, skip_bad=True, drop_last=False, log=lines.append,
                          crop=16, flip_prob=0.5)
    assert loader.skipped == 1 and len(loader.bad_files) == 1 and str(root) in loader.bad_files[0]
    assert len(lines) == 1 and "skipped 1 of 12 samples" in lines[0]
    seen = torch.cat([b["index"] for b in _batches(loader, 2)]).tolist()
    assert sorted(seen) == sorted(2 * [i for i in range(N) if i != index])


def test_two_bad_files_of_one_sample_count_once(synth, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    (root / "rgb/000001.png").unlink()
    _truncate(root)
    (root / "normal/000003.png").unlink()
    with pytest.raises(ShardError, match="rgb/000001.png: missing .* \\(and 2 more bad files\\)"):
        build_loader(root, 4, backend="dali")
    loader = build_loader(root, 4, backend="dali", skip_bad=True, log=None)
    assert loader.skipped == 2 and len(loader.bad_files) == 3 and len(loader) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_without_checksums_fails_in_the_decoder_naming_it(synth, tmp_path, backend):
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    _truncate(root)  # the PNG header survives, so only decoding finds it
    loader = build_loader(root, 4, backend=backend, verify=False, num_workers=0)
    with pytest.raises(ShardError, match="depth/000003.png: not a decodable image"):
        _batches(loader, 2)


def _set_tokens(root, arr):
    np.save(root / "tokens" / "depth.npy", arr)


@pytest.mark.parametrize("breaker, message", [
    (lambda r: _set_tokens(r, np.zeros((N, 3, 3), np.int16)), "tokens/depth.npy: shape \\(12, 3, 3\\), the manifest says"),
    (lambda r: _set_tokens(r, np.zeros((N, 4, 4), np.int64)), "tokens/depth.npy: dtype int64, expected int16"),
    (lambda r: (r / "tokens/depth.npy").unlink(), "tokens/depth.npy: missing"),
    (lambda r: (r / "tokens/depth.npy").write_bytes(b"\x93NUMPY garbage"), "tokens/depth.npy: unreadable"),
    (lambda r: (r / "tokens/caption.lengths.npy").unlink(), "tokens/caption.lengths.npy: missing"),
    (lambda r: (r / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    (lambda r: (r / "manifest.json").unlink(), "manifest.json is missing"),
])
def test_whole_file_problems_raise_even_with_skip_bad(synth, tmp_path, breaker, message):
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    breaker(root)
    for backend in BACKENDS:
        with pytest.raises(ShardError, match=message):
            build_loader(root, 4, backend=backend, skip_bad=True, num_workers=0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(backend="tf"), ValueError, "backend must be 'torch' or 'dali', got 'tf'"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=2.0), ValueError, "batch_size must be an int"),
    (dict(batch_size=13), ValueError, "batch_size 13 > the 12 usable samples"),
    (dict(crop=33), ValueError, "crop=33 is larger than the shards' 32-pixel images"),
    (dict(crop=0), ValueError, "crop must be an int >= 1"),
    (dict(flip_prob=1.5), ValueError, "flip_prob must be a probability in \\[0, 1\\]"),
    (dict(images=["caption"]), ValueError, "'caption' is not an image modality"),
    (dict(images=["rgb", "rgb"]), ValueError, "repeated modality"),
    (dict(images=[], tokens=[]), ValueError, "nothing to load"),
    (dict(tokens=["rgb"]), ShardError, "no tokens for \\['rgb'\\]"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
    (dict(num_workers=-1), ValueError, "num_workers must be an int >= 0"),
    (dict(backend="torch", device_id=0), ValueError, "device_id is for backend='dali'"),
])
def test_bad_arguments(synth, kwargs, error, message):
    kw = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        build_loader(synth, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_decoding_without_a_gpu_says_so(synth):
    with pytest.raises(ValueError, match="device_id=0: no CUDA device is visible"):
        build_loader(synth, 4, backend="dali", device_id=0)


@requires_cuda
def test_mixed_decoding_equals_cpu(synth):
    kw = dict(crop=20, flip_prob=0.5, seed=2)
    for a, b in _pairs(_batches(build_loader(synth, 4, backend="dali", device_id=0, **kw), 2),
                       _batches(build_loader(synth, 4, backend="dali", **kw), 2)):
        assert all(t.is_cuda for t in a["images"].values())
        a["images"] = {m: t.cpu() for m, t in a["images"].items()}
        _equal(a, b)


def test_token_shards_skip_bad_and_the_train_flag(synth, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    _token_row(root)
    with pytest.raises(ShardError, match="tokens/depth.npy: row 5"):
        TokenShards(root)
    lines = []
    ds = TokenShards(root, skip_bad=True, log=lines.append)
    assert ds.skipped == 1 and len(ds) == N - 1 and 5 not in ds.good and "skipped 1 of 12" in lines[0]
    assert all(ds[k][0]["depth"].max() < 64 for k in range(len(ds)))
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert "data.skip_bad=true" in overrides_from_args(p.parse_args(["--skip-bad"]))
    assert "data.skip_bad=true" not in overrides_from_args(p.parse_args([]))
    shards = ["data.source=shards", "data.path=/data", "modalities=auto"]
    assert load_config(None, shards + ["data.skip_bad=true"])["data"]["skip_bad"] is True
    with pytest.raises(ConfigError, match="data.skip_bad must be true or false"):
        load_config(None, shards + ["data.skip_bad=3"])
    with pytest.raises(ConfigError, match="data.skip_bad: settings of data.source 'shards'"):
        load_config(None, ["data.skip_bad=true"])  # the synthetic source has no bad rows to skip


def test_torch_workers_give_the_same_batches(synth):
    kw = dict(crop=20, flip_prob=0.5, seed=9)
    for a, b in _pairs(_batches(build_loader(synth, 4, backend="torch", num_workers=2, **kw), 2),
                       _batches(build_loader(synth, 4, backend="torch", num_workers=0, **kw), 2)):
        _equal(a, b)


def test_shard_source_leaves_bad_rows_out(synth, tmp_path):
    from fourm_fast.train.shards_source import ShardSource
    from fourm_fast.train.trainer import build_model_config

    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    _token_row(root)
    over = ["data.source=shards", f"data.path={root}", "modalities=auto", "data.num_input_tokens=8",
            "data.num_target_tokens=8", "model.overrides={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}"]
    cfg = load_config(None, over)
    with pytest.raises(ShardError, match="tokens/depth.npy: row 5"):
        ShardSource(build_model_config(cfg), cfg["data"], 0)
    cfg = load_config(None, over + ["data.skip_bad=true"])
    src = ShardSource(build_model_config(cfg), cfg["data"], 0)
    ids = np.concatenate([src._indices(4, step) for step in range(11)])
    assert src.skipped == 1 and 5 not in ids and set(ids.tolist()) == set(range(N)) - {5}
    batch, _ = src.global_batch(4, 0)  # span masking has its sentinels: it raised without them
    assert bool(batch.enc_valid.any(1).all()) and bool(batch.dec_valid.any(1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_size_without_checksums_names_the_file(synth, tmp_path, backend):
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    _rewrite(root, "rgb/000002.png", _png(np.zeros((40, 40, 3), np.uint8)), update_checksum=False)
    with pytest.raises(ShardError, match="rgb/000002.png: 40x40 pixels, the manifest says 32x32"):
        build_loader(root, 4, backend=backend, verify=False, num_workers=0)
    # a header that lies about the size is only found by decoding
    data = bytearray((root / "rgb/000002.png").read_bytes())
    data[16:24] = (32).to_bytes(4, "big") * 2
    (root / "rgb/000002.png").write_bytes(bytes(data))
    loader = build_loader(root, 4, backend=backend, verify=False, num_workers=0, crop=16)
    with pytest.raises(ShardError, match="rgb/000002.png: "):
        _batches(loader, 2)


def test_jpeg_images_decode_close_to_pil(synth, tmp_path):
    """JPEG rgb (lossy: DALI's and PIL's IDCT/upsampling may differ by a level or two, so close, not equal)."""
    root = _rgb_resaved(synth, tmp_path / "shards", "JPEG", quality=90)
    kw = dict(images=["rgb", "depth"], crop=20, flip_prob=0.5, seed=1, num_workers=0)
    for a, b in _pairs(_batches(build_loader(root, 4, backend="dali", **kw)),
                       _batches(build_loader(root, 4, backend="torch", **kw))):
        assert a["images"]["rgb"].shape == (4, 3, 20, 20) and torch.equal(a["images"]["depth"], b["images"]["depth"])
        diff = (a["images"]["rgb"].int() - b["images"]["rgb"].int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 8


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_not_applied(synth, tmp_path, fmt):
    # A tagged image is decoded as stored by both backends (DALI's decoder used to rotate it by
    # the tag, PIL does not): the batches stay equal and rgb lines up with depth.
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    root = _rgb_resaved(synth, tmp_path / "shards", fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    kw = dict(images=["rgb"], tokens=[], seed=1, num_workers=0)
    for a, b in _pairs(_batches(build_loader(root, 4, backend="dali", **kw)),
                       _batches(build_loader(root, 4, backend="torch", **kw))):
        if fmt == "PNG":
            assert torch.equal(a["images"]["rgb"], b["images"]["rgb"])
        else:  # two JPEG decoders may differ by a few levels; rotated, the mean difference is tens
            assert (a["images"]["rgb"].int() - b["images"]["rgb"].int()).abs().float().mean() < 1.0


def test_jpeg_with_a_large_app_segment_passes_header_only_checks(synth, tmp_path):
    # verify=False reads the first 64 KiB for the header; a JPEG frame header may come after ICC
    # profiles or EXIF thumbnails larger than that
    root = _rgb_resaved(synth, tmp_path / "shards", "JPEG", checksums=False, quality=95, icc_profile=bytes(90000))
    assert (root / "rgb/000000.jpg").stat().st_size > 90000
    for backend in BACKENDS:
        batches = _batches(build_loader(root, 4, backend=backend, verify=False, num_workers=0, images=["rgb"], tokens=[]))
        assert len(batches) == N // 4 and batches[0]["images"]["rgb"].shape == (4, 3, SIZE, SIZE)


def test_class_ids_must_not_be_jpeg(synth, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(synth, root)
    buf = io.BytesIO()
    Image.open(root / "semseg/000000.png").save(buf, format="JPEG")
    _rewrite(root, "semseg/000000.png", buf.getvalue(), update_checksum=True)
    with pytest.raises(ShardError, match="semseg/000000.png: JPEG is lossy; semseg must be PNG"):
        build_loader(root, 4, backend="dali", images=["semseg"])


@pytest.mark.filterwarnings("error")
def test_tokens_only_and_images_only(synth):
    for kw in (dict(images=[]), dict(images=["semseg"], tokens=[], crop=9)):
        d, t = (_batches(build_loader(synth, 4, backend=b, num_workers=0, seed=4, **kw)) for b in BACKENDS)
        for a, b in _pairs(d, t):
            _equal(a, b)
    assert d[0]["images"]["semseg"].shape == (4, 1, 9, 9) and d[0]["tokens"] == {}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through Linux /proc")
def test_dropped_dali_loader_frees_its_threads_without_gc(synth):
    # the external-source callback must not hold the loader: loader -> pipeline -> callback ->
    # loader was a cycle, and a dropped loader kept the pipeline's threads until a full gc
    import gc

    def threads():
        return len(list(Path("/proc/self/task").iterdir()))

    def drop_one():
        loader = build_loader(synth, 4, backend="dali", tokens=[], num_workers=2)
        next(iter(loader))
        del loader

    drop_one()  # threads that live for the whole process (thread pools started on first use)
    gc.collect()
    before = threads()
    gc.disable()
    try:
        for _ in range(3):
            drop_one()
        # a joined thread can stay listed for a moment; one kept alive by a cycle stays for good
        deadline = time.monotonic() + 10
        while threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threads() <= before
    finally:
        gc.enable()
