"""Benchmark inputs: one seeded random image of a given size, or a video of N frames, with a short question."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covipal.errors import CovipalError
from covipal.models.families import family_of

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
    """Processor outputs for `spec`: {kind: image, size: [h, w], aspect: anyres_max_N?} (the aspect: LLaVA-OneVision
    only) or {kind: video, frames} (frames at the family's side)."""
    processor, config = loaded.processor, loaded.model.config
    family = family_of(loaded.model)
    rng = np.random.default_rng(seed)
    kind = check_input(spec)["kind"]
    content = lambda media: [{"role": "user", "content": [{"type": media}, {"type": "text", "text": QUESTION}]}]  # noqa: E731
    if kind == "image":
        height, width = spec["size"]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return family.bench_input(processor, config, spec, image, None, content)
    side = family.video_frame_side(config)
    frames = rng.integers(0, 256, (int(spec["frames"]), side, side, 3), dtype=np.uint8)
    return family.bench_input(processor, config, spec, None, frames, content)
