"""Pictures of generations: a grid of labelled tiles (images, or text drawn on a white tile).

Deterministic: the same cells give the same PNG bytes (PIL's built-in bitmap font, no timestamps
in the file), so `fourm-fast generate` with the same seed writes identical files.
"""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Cell = tuple[str, "np.ndarray | str | None"]  # (label, uint8 (H, W, 3) image, text, or empty)


def _tile(value, size: int) -> Image.Image:
    if isinstance(value, np.ndarray):
        img = Image.fromarray(value)
        return img.resize((size, size), Image.NEAREST) if img.size != (size, size) else img
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    if isinstance(value, str):
        draw = ImageDraw.Draw(tile)
        font = ImageFont.load_default()
        lines = textwrap.wrap(value, width=max(8, size // 7))[: size // 12]
        for i, line in enumerate(lines):
            draw.text((3, 3 + 12 * i), line, fill=(0, 0, 0), font=font)
    return tile


def render_grid(rows: list[list[Cell]], size: int = 128, label_height: int = 14) -> Image.Image:
    """One row per list of cells; each cell a tile with its label above it."""
    if not rows or not any(rows):
        raise ValueError("render_grid: nothing to draw")
    cols = max(len(r) for r in rows)
    h = size + label_height
    grid = Image.new("RGB", (cols * (size + 4), len(rows) * (h + 4)), (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (label, value) in enumerate(row):
            x, y = c * (size + 4) + 2, r * (h + 4) + 2
            draw.text((x + 2, y), label[: size // 6], fill=(0, 0, 0), font=font)
            grid.paste(_tile(value, size), (x, y + label_height))
    return grid
