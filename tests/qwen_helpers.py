"""The tiny Qwen models of the tests — Qwen2.5-VL and Qwen3-VL (untrained, seeded, larger initial weights so greedy
output varies with the input) — and their inputs: images of native sizes, a video, padded batches.

Test modules that import `qwen_family` run every test once per family: the autouse fixture sets the family the
helpers build for (`current_family()`)."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from conftest import random_image, random_video

from covipal.models.families import family_named
from covipal.models.qwen_architecture import Qwen3ArchitectureSpec, QwenArchitectureSpec

QWEN_SPEC = QwenArchitectureSpec(text_layers=4, initializer_range=0.3)
SPECS = {"qwen2_5_vl": QWEN_SPEC, "qwen3_vl": Qwen3ArchitectureSpec(text_layers=4, initializer_range=0.3)}
QWEN_LAYERS = QWEN_SPEC.text_layers
_MODELS: dict = {}
_CURRENT = {"family": "qwen2_5_vl"}


@pytest.fixture(autouse=True, params=list(SPECS))
def qwen_family(request):
    """Run the test for each Qwen family (Qwen3-VL: DeepStack, no ViT windows)."""
    _CURRENT["family"] = request.param
    yield request.param
    _CURRENT["family"] = "qwen2_5_vl"


def current_family() -> str:
    return _CURRENT["family"]


def _built(family: str):
    """(processor, config) of the family's tiny test model."""
    if ("processor", family) not in _MODELS:
        processor, config, _ = family_named(family).from_spec(asdict(SPECS[family]))
        _MODELS[("processor", family)], _MODELS[("config", family)] = processor, config
    return _MODELS[("processor", family)], _MODELS[("config", family)]


def qwen_processor():
    return _built(current_family())[0]


def qwen_model(role: str = "session", dtype=torch.float32, backend: str = "sdpa"):
    """One instance per (family, role, dtype, backend), all of a family with the same weights: "reference" never
    sees a session."""
    family = current_family()
    key = (family, role, dtype, backend)
    if key not in _MODELS:
        processor, config = _built(family)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SPECS[family].seed)
            model = family_named(family).model_class._from_config(
                copy.deepcopy(config), dtype=torch.float32, attn_implementation=backend
            )
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
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


def save_tiny_qwen(directory, spec=None, family: str | None = None):
    """The tiny Qwen of `family` (default: the current one; or one of `spec`): weights (seeded) and processor saved
    as one checkpoint in `directory`."""
    family = family or current_family()
    spec = SPECS[family] if spec is None else spec
    processor, config, _ = family_named(family).from_spec(asdict(spec))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = family_named(family).model_class._from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
