"""A handful of drawn samples (shapes on a plain background, a moving shape video) for smoke runs."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from covipal.data.sample import Sample

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def _shape_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    name = str(rng.choice(list(COLOURS)))
    x, y = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 16))
    draw.ellipse([x, y, x + 14, y + 14], fill=COLOURS[name])
    return image, name


def demo_samples(count: int, seed: int = 0, frames: int = 8) -> list[Sample]:
    """`count` samples cycling through: anyres image, two images, video."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        kind = index % 3
        if kind == 0:
            image, colour = _shape_image(rng, 96, 64)
            samples.append(Sample("what colour is the circle?", images=[image], answer=colour))
        elif kind == 1:
            (first, colour), (second, _) = _shape_image(rng, 40, 40), _shape_image(rng, 32, 64)
            samples.append(Sample("what colour is the circle in the first image?", [first, second], answer=colour))
        else:
            video = np.full((frames, 32, 32, 3), 128, dtype=np.uint8)
            colour = str(rng.choice(list(COLOURS)))
            for frame in range(frames):
                x = 2 + 3 * frame
                video[frame, 12:20, x : x + 8] = COLOURS[colour]
            samples.append(Sample("what colour is the moving square?", video=video, answer=colour))
    return samples
