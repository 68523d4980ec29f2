"""Synthetic world: reproducible, modalities agree, box codec, shards with clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fourm_fast.data import (
    ShardError,
    boxes_to_text,
    caption,
    make_sample,
    read_manifest,
    read_sample,
    render,
    sample_scene,
    text_to_boxes,
    write_synthetic,
)
from fourm_fast.data.synthetic import BACKGROUND_DEPTH, CLASS_ID, _surface


def test_scenes_are_reproducible_and_varied():
    a, b = make_sample(3, 7, 32), make_sample(3, 7, 32)
    for k in a:
        assert np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k]
    counts = {len(sample_scene(0, i)) for i in range(200)}
    assert counts == set(range(1, 7))
    assert make_sample(3, 8, 32)["caption"] != a["caption"] or not np.array_equal(make_sample(3, 8, 32)["rgb"], a["rgb"])


@pytest.mark.parametrize("index", range(6))
def test_modalities_agree_pixel_by_pixel(index):
    """An independent per-pixel z-test over the objects reproduces semseg and depth."""
    size = 24
    objs = sample_scene(11, index)
    out = render(objs, size)
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(c, c)
    surfaces = [_surface(o, xx, yy) for o in objs]
    for y in range(size):
        for x in range(size):
            best, cls = BACKGROUND_DEPTH, 0
            for o, (mask, depth, _) in zip(objs, surfaces):
                if mask[y, x] and depth[y, x] < best:
                    best, cls = depth[y, x], CLASS_ID[o.shape]
            assert out["semseg"][y, x] == cls and out["depth"][y, x] == np.float32(best), (y, x)
    norms = np.linalg.norm(out["normal"], axis=-1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    # a class change is an edge on both sides, so it stays one under a horizontal or vertical flip
    for seg, edges in ((out["semseg"], out["edges"]), (out["semseg"][:, ::-1], out["edges"][:, ::-1]),
                       (out["semseg"][::-1], out["edges"][::-1])):
        change = np.zeros((size, size), bool)
        change[:, 1:] |= seg[:, 1:] != seg[:, :-1]
        change[1:, :] |= seg[1:, :] != seg[:-1, :]
        assert (edges[change] == 255).all(), "a class change is always an edge"


def test_caption_and_boxes_describe_the_scene():
    for i in range(20):
        objs = sample_scene(2, i)
        text = caption(objs)
        near = min(objs, key=lambda o: o.depth)
        assert text.startswith(f"a {near.size} {near.colour} {near.shape}")
        boxes = text_to_boxes(make_sample(2, i, 16)["det"])
        assert len(boxes) == len(objs)
        for (x0, y0, x1, y1, cls), o in zip(boxes, objs):
            assert cls == o.shape
            for got, want in zip((x0, y0, x1, y1), o.box()):
                assert abs(got - want) <= 0.5 / 999 + 1e-9


def test_caption_states_where_the_nearest_object_is_and_counts_the_rest():
    """x grows to the right and y downwards: the nearest object's place relative to the second
    nearest along the larger offset, then how many objects are left."""
    from fourm_fast.data.synthetic import SceneObject

    def obj(cx, cy, depth, shape="circle"):
        return SceneObject(shape, "red", "small", cx, cy, depth)

    far = obj(0.5, 0.5, 6.0, "square")
    for (cx, cy), word in (((0.2, 0.45), "left of"), ((0.8, 0.6), "right of"), ((0.45, 0.1), "above"),
                           ((0.55, 0.9), "below")):
        assert caption([far, obj(cx, cy, 3.0)]) == f"a small red circle {word} a small red square"
    extra = [obj(0.1, 0.1, 8.0), obj(0.9, 0.9, 7.0), obj(0.3, 0.9, 8.5)]
    assert caption([far, obj(0.2, 0.5, 3.0)] + extra[:1]).endswith("square and 1 other object")
    assert caption([far, obj(0.2, 0.5, 3.0)] + extra).endswith("square and 3 other objects")
    assert caption([obj(0.2, 0.5, 3.0)]) == "a small red circle"


def test_jpeg_header_is_the_frame_not_a_huffman_table_before_it():
    """Markers 0xC4 (DHT), 0xC8 and 0xCC (DAC) sit among the SOF codes 0xC0-0xCF but are not frames;
    encoders may write the Huffman tables first (here DHT is moved before the frame: still a valid
    JPEG; PIL writes no 0xC8 or 0xCC to move)."""
    import io
    import struct

    from PIL import Image

    from fourm_fast.data.validate import _image_header

    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 90)).save(buf, format="JPEG")
    data = buf.getvalue()
    segments, pos = [], 2
    while data[pos + 1] != 0xDA:  # up to the start of scan
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segments.append(data[pos:pos + 2 + length])
        pos += 2 + length
    dht = [s for s in segments if s[1] == 0xC4]
    assert dht and segments.index(dht[0]) > [s[1] for s in segments].index(0xC0)  # PIL writes the frame first
    moved = b"\xff\xd8" + b"".join(dht + [s for s in segments if s[1] != 0xC4]) + data[pos:]
    assert Image.open(io.BytesIO(moved)).size == (40, 24)
    assert _image_header(moved) == _image_header(data) == ("jpeg", 40, 24, 3, 8)


def test_box_codec_round_trip_and_errors():
    boxes = [(0.0, 0.1, 0.5, 1.0, "circle"), (0.25, 0.25, 0.75, 0.999, "square")]
    text = boxes_to_text(boxes)
    assert text == "v0=0 v1=100 v2=500 v3=999 circle v0=250 v1=250 v2=749 v3=998 square"
    assert boxes_to_text(text_to_boxes(text)) == text
    with pytest.raises(ValueError, match="cannot parse at character 0"):
        text_to_boxes("v0=1 v1=2 circle")


def test_shards_round_trip_and_name_bad_files(tmp_path):
    m = write_synthetic(tmp_path, 5, size=32, seed=4, progress=False)
    assert read_manifest(tmp_path)["num_samples"] == 5 and m["modalities"][0] == "rgb"
    s = read_sample(tmp_path, 2)
    ref = make_sample(4, 2, 32)
    assert np.array_equal(s["rgb"], ref["rgb"]) and np.array_equal(s["semseg"], ref["semseg"])
    # stored to the nearest millimetre / 1/127.5 step (a truncating cast was up to a whole step off)
    assert np.abs(s["depth"] - ref["depth"]).max() <= 0.5e-3 + 1e-6
    assert np.abs(s["normal"] - ref["normal"]).max() <= 0.5 / 127.5 + 1e-6
    assert s["caption"] == ref["caption"] and s["det"] == ref["det"]
    bad = tmp_path / "depth" / "000003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ShardError, match="depth/000003.png: checksum does not match"):
        read_sample(tmp_path, 3)
    with pytest.raises(ShardError, match="depth/000003.png: not a readable image"):
        read_sample(tmp_path, 3, verify=False)
    (tmp_path / "caption" / "000004.txt").unlink()
    with pytest.raises(ShardError, match="caption/000004.txt: missing"):
        read_sample(tmp_path, 4)
    with pytest.raises(ShardError, match="out of range"):
        read_sample(tmp_path, 5)
    with pytest.raises(ShardError, match="manifest.json is missing"):
        read_manifest(tmp_path / "rgb")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("checksums", "extensions", "num_samples"):
        partial = {k: v for k, v in manifest.items() if k != key}
        (tmp_path / "manifest.json").write_text(json.dumps(partial))
        with pytest.raises(ShardError, match=f"manifest.json: the manifest has no '{key}'"):
            read_manifest(tmp_path)


def test_manifest_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The manifest goes to a temporary file renamed into place: a writer killed mid-write leaves
    no half manifest that read_manifest would take for a shard folder."""
    import os

    renames = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((Path(a).name, Path(b).name)) or replace(a, b))
    write_synthetic(tmp_path, 2, size=16, progress=False)
    assert ("manifest.json.tmp", "manifest.json") in renames
    assert not (tmp_path / "manifest.json.tmp").exists() and read_manifest(tmp_path)["num_samples"] == 2


def test_cli_synth(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fourm_fast", "data", "synth", "--out", str(tmp_path), "--n", "3",
                          "--size", "16"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote 3 scenes" in res.stderr and (tmp_path / "manifest.json").exists()
    (tmp_path / "afile").write_text("x")  # --out a file: a NotADirectoryError traceback before
    res = subprocess.run([sys.executable, "-m", "fourm_fast", "data", "synth", "--out", str(tmp_path / "afile"), "--n", "1",
                          "--size", "16"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("fourm-fast data synth: error:") and "Traceback" not in res.stderr


def _replace_png(root, rel, arr):
    """Write arr as root/rel (a PNG) and record its checksum, as a deliberate edit would."""
    import hashlib
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (root / rel).write_bytes(buf.getvalue())
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["checksums"][rel] = hashlib.sha256(buf.getvalue()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("rel, arr, message", [
    # PIL decodes all of these; an 8-bit depth would read 40x too small, the others broke torch.stack
    ("depth/000001.png", np.full((16, 16), 200, np.uint8), "1 channel\\(s\\) of 8 bits, depth needs 1 of 16"),
    ("rgb/000001.png", np.zeros((32, 32, 3), np.uint8), "32x32 pixels, the manifest says 16x16"),
    ("rgb/000001.png", np.zeros((16, 16, 4), np.uint8), "4 channel\\(s\\) of 8 bits, rgb needs 3 of 8"),
    ("rgb/000001.png", np.zeros((16, 16), np.uint8), "1 channel\\(s\\) of 8 bits, rgb needs 3 of 8"),
])
def test_read_sample_applies_the_loaders_image_rule(tmp_path, rel, arr, message):
    write_synthetic(tmp_path, 3, size=16, progress=False)
    _replace_png(tmp_path, rel, arr)
    m = rel.split("/")[0]
    with pytest.raises(ShardError, match=f"{rel}: {message}.*{m} needs 16x16 pixels"):
        read_sample(tmp_path, 1, modalities=[m])
    assert read_sample(tmp_path, 0, modalities=[m])[m].shape[:2] == (16, 16)  # the good files still read


@pytest.mark.parametrize("edit, message", [
    (lambda m: 5, "holds 5, not a JSON object"),
    (lambda m: {**m, "num_samples": "3"}, "'num_samples' is \"3\", expected an integer"),
    (lambda m: {**m, "num_samples": 3.0}, "'num_samples' is 3.0, expected an integer"),
    (lambda m: {**m, "checksums": None}, "'checksums' is null, expected an object"),
    (lambda m: {k: v for k, v in m.items() if k != "size"}, "the manifest has no 'size'"),
    (lambda m: {**m, "size": "16"}, "'size' is \"16\", expected an integer"),
    (lambda m: {**m, "modalities": "rgb"}, "'modalities' is \"rgb\", expected a list"),
    (lambda m: {**m, "tokens": ["rgb"]}, "'tokens' is \\[\"rgb\"\\], expected an object"),
    (lambda m: {**m, "tokens": {"rgb": {"shape": None, "num_codes": 8}}}, "'tokens.rgb.shape' is null"),
    (lambda m: {**m, "tokens": {"rgb": {"shape": [3, 2, 2]}}}, "tokens.rgb has no 'num_codes'"),
])
def test_manifest_types_are_checked_when_it_is_read(tmp_path, edit, message):
    write_synthetic(tmp_path, 3, size=16, progress=False)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ShardError, match=f"manifest.json: {message}"):
        read_sample(tmp_path, 0, modalities=["rgb"])


def test_build_loader_says_when_nothing_was_requested(tmp_path):
    from fourm_fast.data import build_loader

    write_synthetic(tmp_path, 3, size=16, progress=False)
    with pytest.raises(ValueError, match="nothing to load: images=\\[\\] and tokens=\\[\\] request no modality"):
        build_loader(tmp_path, 1, images=[], tokens=[], num_workers=0)
    with pytest.raises(ValueError, match="images must be a list of modality names, got the string 'rgb'"):
        build_loader(tmp_path, 1, images="rgb", tokens=[], num_workers=0)
