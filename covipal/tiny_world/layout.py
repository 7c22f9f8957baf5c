"""Reading a model's `TokenLayout` of the tiny world's pictures (the ground truth's coordinates) off the model and
its processor, through the model family's adapter: the same oracle, benchmarks and grounding terms then serve the
tiny LLaVA-OneVision and the tiny Qwen2.5-VL."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covipal.data.chat import processor_inputs, user_message
from covipal.data.sample import Sample
from covipal.models.families import family_of, visual_mask
from covipal.tiny_world.synthetic import IMAGE_SIZE, VIDEO_FRAMES, VIDEO_SIZE, TokenLayout


def _visual_tokens(model, processor, sample: Sample) -> int:
    text = processor.apply_chat_template([user_message(sample)], tokenize=False, add_generation_prompt=True)
    inputs = processor_inputs(processor, [text], [sample])
    return int(visual_mask(model.config, inputs["input_ids"]).sum())


def layout_of(model, processor) -> TokenLayout:
    """Where a tiny-world image (IMAGE_SIZE²) and video (VIDEO_FRAMES × VIDEO_SIZE²) lie in `model`'s visual
    tokens as `processor` lays them out."""
    family = family_of(model)
    panels = family.image_token_panels(model, processor, IMAGE_SIZE, IMAGE_SIZE)
    per_step, rows, columns = family.video_token_grid(model, processor, VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE)
    image = Sample("?", images=[Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))])
    video = Sample("?", video=np.zeros((VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8))
    return TokenLayout(
        image_panels=tuple(tuple(int(v) for v in panel) for panel in panels),
        image_tokens=_visual_tokens(model, processor, image),
        frames_per_step=per_step,
        video_rows=rows,
        video_columns=columns,
        video_tokens=_visual_tokens(model, processor, video),
        name=family.name,
    )
