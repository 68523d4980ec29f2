"""A synthetic world of aligned modalities, rendered with numpy from one scene description.

A scene is 1-6 objects (circle = sphere, square = upright tile, triangle = tilted plate) with a
colour, a size, a position and a depth, in front of a floor-and-sky background. Every modality is
computed from the same description with one z-buffer, so they agree by construction:

  rgb      (H, W, 3) uint8   Lambert-shaded colours, nearest surface wins (occlusion)
  depth    (H, W) float32    distance of the visible surface (background 10)
  normal   (H, W, 3) float32 unit surface normals (camera looks along -z)
  semseg   (H, W) uint8      class of the visible surface (0 background, 1 circle, 2 square, 3 triangle)
  edges    (H, W) uint8      255 on both pixels of each neighbouring pair whose visible object differs
  caption  str               "a small red circle left of a large blue square"
  det      str               4M's box text: "v0=x0 v1=y0 v2=x1 v3=y1 class" per object, corners in 0..999

Scenes are a pure function of (seed, index).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
CLASS_ID = {s: i + 1 for i, s in enumerate(SHAPES)}
COLOURS = {"red": (215, 48, 39), "green": (60, 170, 70), "blue": (45, 90, 200), "yellow": (235, 205, 50),
           "purple": (140, 70, 170), "orange": (245, 140, 40), "white": (235, 235, 235), "cyan": (50, 190, 200)}
SIZES = {"small": 0.09, "medium": 0.14, "large": 0.2}  # half extent, as a fraction of the image side
BACKGROUND_DEPTH = 10.0
LIGHT = np.array([-0.4, -0.5, 0.77], dtype=np.float32) / np.linalg.norm([-0.4, -0.5, 0.77])
TRIANGLE_NORMAL = np.array([0.0, -0.45, 0.89], dtype=np.float32) / np.linalg.norm([0.0, -0.45, 0.89])


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float      # centre, fractions of the image side (x right, y down)
    cy: float
    depth: float   # distance of the object's front, 2..9

    @property
    def half(self) -> float:
        return SIZES[self.size]

    def box(self) -> tuple[float, float, float, float]:
        h = self.half
        return (max(self.cx - h, 0.0), max(self.cy - h, 0.0), min(self.cx + h, 1.0), min(self.cy + h, 1.0))


def sample_scene(seed: int, index: int) -> list[SceneObject]:
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 7))
    objs = []
    for _ in range(n):
        size = str(rng.choice(list(SIZES)))
        h = SIZES[size]
        objs.append(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size,
                                float(rng.uniform(h, 1 - h)), float(rng.uniform(h, 1 - h)), float(rng.uniform(2.0, 9.0))))
    return objs


def _surface(obj: SceneObject, xx: np.ndarray, yy: np.ndarray):
    """Mask, depth and normals of one object on the pixel grid."""
    dx, dy, h = xx - obj.cx, yy - obj.cy, obj.half
    if obj.shape == "circle":
        r2 = dx * dx + dy * dy
        mask = r2 < h * h
        dz = np.sqrt(np.clip(h * h - r2, 0.0, None))
        depth = obj.depth + (h - dz) / h          # the sphere bulges towards the camera
        normal = np.stack([dx, dy, dz], -1) / h
    elif obj.shape == "square":
        mask = (np.abs(dx) < h) & (np.abs(dy) < h)
        depth = np.full_like(xx, obj.depth)
        normal = np.broadcast_to(np.array([0.0, 0.0, 1.0], dtype=np.float32), xx.shape + (3,))
    else:  # upward-pointing triangle, its plate tilted back
        mask = (dy < h) & (dy > -h) & (np.abs(dx) < (dy + h) / 2)
        depth = obj.depth + 0.5 * (h - dy) / h
        normal = np.broadcast_to(TRIANGLE_NORMAL, xx.shape + (3,))
    return mask, depth.astype(np.float32), np.asarray(normal, dtype=np.float32)


def render(objs: list[SceneObject], size: int) -> dict[str, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(c, c)
    sky = yy < 0.45
    rgb = np.where(sky[..., None], np.array([150, 190, 230], np.float32), np.array([120, 110, 95], np.float32))
    rgb = rgb * (0.85 + 0.15 * yy[..., None])
    depth = np.full((size, size), BACKGROUND_DEPTH, np.float32)
    normal = np.zeros((size, size, 3), np.float32)
    normal[..., 2] = 1.0
    semseg = np.zeros((size, size), np.uint8)
    instance = np.zeros((size, size), np.int16)
    for k, obj in enumerate(objs, start=1):
        mask, d, n = _surface(obj, xx, yy)
        win = mask & (d < depth)  # z-buffer: the nearest surface is the visible one
        shade = np.clip(n @ LIGHT, 0.15, 1.0)
        rgb = np.where(win[..., None], np.array(COLOURS[obj.colour], np.float32) * shade[..., None], rgb)
        depth = np.where(win, d, depth)
        normal = np.where(win[..., None], n, normal)
        semseg = np.where(win, np.uint8(CLASS_ID[obj.shape]), semseg)
        instance = np.where(win, np.int16(k), instance)
    # both pixels of a differing pair, so edges stay on the boundary when a sample is flipped or
    # cropped (marking one side put a flipped sample's edges a pixel off its semseg boundary)
    edges = np.zeros((size, size), bool)
    dx, dy = instance[:, 1:] != instance[:, :-1], instance[1:, :] != instance[:-1, :]
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    return {"rgb": np.clip(rgb, 0, 255).astype(np.uint8), "depth": depth, "normal": normal.astype(np.float32),
            "semseg": semseg, "edges": (edges * 255).astype(np.uint8)}


def _phrase(o: SceneObject) -> str:
    return f"{o.size} {o.colour} {o.shape}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def caption(objs: list[SceneObject]) -> str:
    """Nearest two objects and where the first is relative to the second, plus a count of the rest."""
    near = sorted(objs, key=lambda o: o.depth)
    text = f"a {_phrase(near[0])}"
    if len(near) > 1:
        text += f" {_relation(near[0], near[1])} a {_phrase(near[1])}"
    if len(near) > 2:
        rest = len(near) - 2
        text += f" and {rest} other object{'s' if rest > 1 else ''}"
    return text


def boxes_to_text(boxes: list[tuple[float, float, float, float, str]]) -> str:
    """4M's box text: corners quantised to 0..999 as v0=.. v1=.. v2=.. v3=.., then the class name."""
    parts = []
    for x0, y0, x1, y1, cls in boxes:
        q = [int(round(min(max(v, 0.0), 1.0) * 999)) for v in (x0, y0, x1, y1)]
        parts.append(f"v0={q[0]} v1={q[1]} v2={q[2]} v3={q[3]} {cls}")
    return " ".join(parts)


_BOX = re.compile(r"v0=(\d{1,3}) v1=(\d{1,3}) v2=(\d{1,3}) v3=(\d{1,3}) ([a-z_]+)")


def text_to_boxes(text: str) -> list[tuple[float, float, float, float, str]]:
    """Inverse of boxes_to_text (corners back in [0, 1], exact to 1/999); malformed text raises."""
    boxes, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _BOX.match(text, pos)
        if m is None:
            raise ValueError(f"box text: cannot parse at character {pos}: {text[pos:pos + 40]!r}")
        boxes.append((*(int(g) / 999 for g in m.groups()[:4]), m.group(5)))
        pos = m.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return boxes


def det_text(objs: list[SceneObject]) -> str:
    return boxes_to_text([(*o.box(), o.shape) for o in objs])


def make_sample(seed: int, index: int, size: int) -> dict:
    objs = sample_scene(seed, index)
    out = render(objs, size)
    out["caption"] = caption(objs)
    out["det"] = det_text(objs)
    return out
