"""Kept-token heat maps: an image with the patches whose visual tokens were pruned dimmed.

Where each visual token of an image comes from is the model family's knowledge (covipal/models/families): the
panels of the image in its token sequence — for LLaVA-OneVision the base view (the whole image squeezed into one
crop) and the high-resolution grid left after anyres unpadding (each row closed by a newline token), read off the
model's own packing; for Qwen2.5-VL one grid of merged tokens at the processor's resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from covipal.models.families import family_of


def _dim(canvas: np.ndarray, cells: np.ndarray, factor: float = 0.25) -> np.ndarray:
    """`canvas` with each False cell of the boolean grid `cells` darkened (cells spread evenly over it)."""
    height, width = canvas.shape[:2]
    rows, columns = cells.shape
    ys = (np.arange(height) * rows // height)[:, None]
    xs = (np.arange(width) * columns // width)[None, :]
    pruned = ~cells[ys, xs]
    out = canvas.astype(np.float32)
    out[pruned] *= factor
    return out.astype(np.uint8)


def kept_token_heatmap(model, processor, image: Image.Image, kept: np.ndarray, title: str = "") -> Image.Image:
    """One panel per grid the image's tokens form (LLaVA-OneVision: the base view and the high-resolution grid),
    side by side, with pruned patches dimmed. `kept`: bool over the image's visual tokens in sequence order
    (newline tokens included)."""
    picture = np.asarray(image.convert("RGB"))
    panels = []
    for start, rows, columns, stride in family_of(model).image_token_panels(
        model, processor, image.height, image.width
    ):
        grid = kept[start : start + rows * stride].reshape(rows, stride)[:, :columns]
        panels.append(_dim(picture, grid))
    scale = max(1, 256 // max(picture.shape[:2]))
    tiles = [Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST) for p in panels]
    header = 28 if title else 0
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height + header), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, header))
        x += tile.width + 8
    if title:
        ImageDraw.Draw(sheet).text((4, 4), title[:120], fill=(0, 0, 0))
    return sheet


def save_heatmap(model, processor, image: Image.Image, kept: np.ndarray, path: Path, title: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kept_token_heatmap(model, processor, image, kept, title).save(path)
    return path
