"""The tiny Qwen2.5-VL of the tests (untrained, seeded, larger initial weights so greedy output varies with the
input) and its inputs: images of native sizes, a video, padded batches."""

from __future__ import annotations

import copy

import torch
from conftest import random_image, random_video
from transformers import Qwen2_5_VLForConditionalGeneration

from covipal.models.qwen_architecture import QwenArchitectureSpec, qwen_processor_and_config

QWEN_SPEC = QwenArchitectureSpec(text_layers=4, initializer_range=0.3)
QWEN_LAYERS = QWEN_SPEC.text_layers
_MODELS: dict = {}


def qwen_processor():
    if "processor" not in _MODELS:
        _MODELS["processor"], _MODELS["config"] = qwen_processor_and_config(QWEN_SPEC)
    return _MODELS["processor"]


def qwen_model(role: str = "session", dtype=torch.float32, backend: str = "sdpa"):
    """One instance per (role, dtype, backend), all with the same weights: "reference" never sees a session."""
    key = (role, dtype, backend)
    if key not in _MODELS:
        qwen_processor()
        config = copy.deepcopy(_MODELS["config"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(QWEN_SPEC.seed)
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                config, dtype=torch.float32, attn_implementation=backend
            )
        tok = _MODELS["processor"].tokenizer
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        _MODELS[key] = model.to(dtype).eval()
    return _MODELS[key]


def qwen_prompt(processor, text: str, images: int = 0, videos: int = 0) -> str:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def qwen_inputs(kind: str, seed: int = 0, dtype=torch.float32) -> dict:
    """image (native 64×96), video (8 frames), batch (two images of different sizes, left-padded), mixed (an image
    prompt and a two-image prompt), text."""
    processor = qwen_processor()
    if kind == "image":
        out = processor(
            text=qwen_prompt(processor, "what colour is the circle?", images=1),
            images=random_image(seed, 64, 96),
            return_tensors="pt",
        )
    elif kind == "video":
        out = processor(
            text=qwen_prompt(processor, "what moves first?", videos=1),
            videos=[random_video(seed, frames=8, size=32)],
            return_tensors="pt",
        )
    elif kind == "batch":
        out = processor(
            text=[
                qwen_prompt(processor, "are they the same?", images=2),
                qwen_prompt(processor, "what colour is the big square at the top right?", images=1),
            ],
            images=[random_image(seed, 40, 40), random_image(seed + 1, 64, 32), random_image(seed + 2, 64, 96)],
            return_tensors="pt",
            padding=True,
        )
    elif kind == "text":
        out = processor(text=qwen_prompt(processor, "how many objects are there?"), return_tensors="pt")
    else:
        raise ValueError(kind)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in dict(out).items()}


def qwen_positions(model, inputs) -> torch.Tensor:
    """The model's own 3D positions [3, B, T] of `inputs` (what a stock forward uses)."""
    return model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )[0]


def qwen_batch_samples(dtype=torch.float32) -> list[dict]:
    """The two samples of `qwen_inputs("batch")`, each processed alone (no padding)."""
    processor = qwen_processor()
    singles = [
        processor(
            text=[qwen_prompt(processor, "are they the same?", images=2)],
            images=[random_image(0, 40, 40), random_image(1, 64, 32)],
            return_tensors="pt",
        ),
        processor(
            text=[qwen_prompt(processor, "what colour is the big square at the top right?", images=1)],
            images=[random_image(2, 64, 96)],
            return_tensors="pt",
        ),
    ]
    return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in dict(one).items()} for one in singles]


def save_tiny_qwen(directory, spec=QWEN_SPEC):
    """The tiny Qwen's weights (seeded) and processor saved as one checkpoint in `directory`."""
    processor, config = qwen_processor_and_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
