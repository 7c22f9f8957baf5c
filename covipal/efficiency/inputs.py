"""Benchmark inputs: one seeded random image of a given size, or a video of N frames, with a short question."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covipal.errors import CovipalError

QUESTION = "describe what you see in one sentence."


EXAMPLE = "e.g. inputs=[{kind:image,size:[768,768]},{kind:video,frames:32}]"


def check_input(spec) -> dict:
    """`spec` if it is a bench input ({kind: image, size: [h, w], aspect?} or {kind: video, frames: N}), else the
    one-line error naming it."""
    if not isinstance(spec, dict):
        raise CovipalError(f"bench input {spec!r} is not a mapping; {EXAMPLE}")
    kind = spec.get("kind")
    if kind == "image":
        size = spec.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive(v) for v in size)):
            raise CovipalError(f"bench input {spec}: size={size!r} must be [height, width] in pixels; {EXAMPLE}")
        return spec
    if kind == "video":
        if not _positive(spec.get("frames")):
            raise CovipalError(
                f"bench input {spec}: frames={spec.get('frames')!r} must be a positive integer; {EXAMPLE}"
            )
        return spec
    raise CovipalError(f"bench input {spec} has kind={kind!r}; use kind: image or video, {EXAMPLE}")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def input_name(spec: dict) -> str:
    if spec["kind"] == "image":
        return f"image {spec['size'][0]}x{spec['size'][1]}"
    return f"video {spec['frames']}f"


def build_input(loaded, spec: dict, seed: int = 0) -> dict:
    """Processor outputs for `spec`: {kind: image, size: [h, w], aspect: anyres_max_N?} or {kind: video, frames}."""
    processor, config = loaded.processor, loaded.model.config
    rng = np.random.default_rng(seed)
    kind = spec.get("kind")
    if kind == "image":
        aspect = spec.get("aspect")
        if aspect:  # as training and the paper's efficiency figures use it (set on this model instance)
            config.vision_aspect_ratio = aspect
            processor.vision_aspect_ratio = aspect
        height, width = spec["size"]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(processor(text=text, images=image, return_tensors="pt"))
    if kind == "video":
        side = config.vision_config.image_size
        frames = rng.integers(0, 256, (int(spec["frames"]), side, side, 3), dtype=np.uint8)
        content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(processor(text=text, videos=[frames], return_tensors="pt"))
    raise CovipalError(f"bench input {spec} has kind={kind!r}; use kind: image or video, {EXAMPLE}")
