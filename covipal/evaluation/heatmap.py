"""Kept-token heat maps: an image with the patches whose visual tokens were pruned dimmed.

Where each visual token of an image comes from is read off the model's own packing
(`pack_image_features`, run on placeholder features), so the map is exact for any anyres configuration: the
base view (the whole image squeezed into one crop, a side×side grid) and the high-resolution grid left after
unpadding (rows × columns, each row closed by a newline token), which covers the original image evenly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape


def image_token_layout(model, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(base side, high-resolution rows, columns) of an image of (height, width) in `model`'s visual tokens;
    rows = 0 when the image takes a single crop."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    grid_h, grid_w = get_anyres_image_grid_shape(
        image_size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    placeholder = torch.zeros(1 + grid_h * grid_w, side * side, 1)
    packed, _ = model.model.pack_image_features(
        [placeholder],
        torch.tensor([image_size]),
        image_newline=torch.ones(1),
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    flags = packed[0][side * side :, 0]
    newlines = torch.nonzero(flags == 1).squeeze(1)
    if len(newlines) == 0:
        return side, 0, 0
    columns = int(newlines[0])
    return side, len(newlines), columns


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


def kept_token_heatmap(model, image: Image.Image, kept: np.ndarray, title: str = "") -> Image.Image:
    """Two panels side by side — the base view and the high-resolution grid — with pruned patches dimmed.
    `kept`: bool over the image's visual tokens in sequence order (newline tokens included)."""
    side, rows, columns = image_token_layout(model, (image.height, image.width))
    picture = np.asarray(image.convert("RGB"))
    panels = [_dim(picture, kept[: side * side].reshape(side, side))]
    if rows:
        grid = kept[side * side : side * side + rows * (columns + 1)].reshape(rows, columns + 1)[:, :columns]
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


def save_heatmap(model, image: Image.Image, kept: np.ndarray, path: Path, title: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kept_token_heatmap(model, image, kept, title).save(path)
    return path
