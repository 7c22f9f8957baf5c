"""Qwen2.5-VL and Qwen3-VL architectures of any size from a spec, with the local word tokenizer (Qwen's
placeholders and template): transformers' own classes and config, built with no download. The tiny Qwen
(covipal/tiny_world/model.py) is built from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from covipal.models.tokenizer import QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, VISION_START, build_word_tokenizer


@dataclass
class QwenArchitectureSpec:
    """Sizes of the model. A visual token is a merge×merge block of patch_size² pixel patches (and a pair of
    frames in video); `min_pixels`/`max_pixels` bound the native resolution images are resized to; the rotary
    sections split head_dim/2 over (temporal, height, width)."""

    patch_size: int = 8
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 16 * 16
    max_pixels: int = 128 * 128
    video_max_pixels: int = 64 * 64
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    window_size: int = 32  # pixels: windows of (window_size / patch_size / merge_size)² visual tokens
    fullatt_blocks: list[int] = field(default_factory=lambda: [1])
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 12
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    initializer_range: float = 0.02
    words: list[str] = field(default_factory=list)
    seed: int = 0


def _vision_fields(spec: QwenArchitectureSpec) -> dict:
    """The ViT config fields both generations share."""
    return dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        out_hidden_size=spec.text_hidden,
        initializer_range=spec.initializer_range,
    )


def _text_fields(spec: QwenArchitectureSpec, tokenizer) -> dict:
    """The LLM config fields both generations share (the vocabulary and special tokens from `tokenizer`)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=8192,
        initializer_range=spec.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def _model_fields(spec: QwenArchitectureSpec, tokenizer) -> dict:
    """The top-level config fields both generations share: the placeholders' and markers' ids."""
    return dict(
        image_token_id=tokenizer.convert_tokens_to_ids(QWEN_IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(QWEN_VIDEO_TOKEN),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        tie_word_embeddings=True,
        initializer_range=spec.initializer_range,
    )


def _rope(spec: QwenArchitectureSpec) -> dict:
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)}


def _processor_parts(spec: QwenArchitectureSpec):
    """(tokenizer, image processor, the patch sizes video processors take) of both generations."""
    tokenizer = build_word_tokenizer(spec.words, placeholders="qwen")
    common = dict(patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size)
    return tokenizer, Qwen2VLImageProcessor(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, **common), common


def qwen_model_config(spec: QwenArchitectureSpec, tokenizer) -> Qwen2_5_VLConfig:
    vision = {
        **_vision_fields(spec),
        "window_size": spec.window_size,
        "fullatt_block_indexes": list(spec.fullatt_blocks),
    }
    text = {**_text_fields(spec, tokenizer), "rope_parameters": _rope(spec)}
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_model_fields(spec, tokenizer))


def qwen_local_processor(spec: QwenArchitectureSpec) -> Qwen2_5_VLProcessor:
    tokenizer, image_processor, common = _processor_parts(spec)
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.video_max_pixels},
        do_sample_frames=False,
        cap_pixels_per_frame=True,  # qwen-vl-utils' per-frame cap (transformers 5.23 warns without a choice)
        **common,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def qwen_processor_and_config(spec: QwenArchitectureSpec):
    """The local processor for `spec` and the model config that matches its tokenizer (placeholders, pad, eos)."""
    processor = qwen_local_processor(spec)
    return processor, qwen_model_config(spec, processor.tokenizer)


@dataclass
class Qwen3ArchitectureSpec(QwenArchitectureSpec):
    """Qwen3-VL's sizes: Qwen2.5-VL's fields without windows (`window_size` and `fullatt_blocks` are unused: every
    ViT block attends within its image or frame pair, and its MLP is not gated), plus a learned square grid of
    `position_embeddings` resampled to each image, and `deepstack_blocks`: the ViT blocks whose merged output
    DeepStack adds to the visual tokens of the first len(deepstack_blocks) LLM layers. The LLM's rotary sections
    are interleaved over (temporal, height, width)."""

    position_embeddings: int = 64
    deepstack_blocks: list[int] = field(default_factory=lambda: [0, 1])


def qwen3_model_config(spec: Qwen3ArchitectureSpec, tokenizer) -> Qwen3VLConfig:
    vision = {
        **_vision_fields(spec),
        "num_position_embeddings": spec.position_embeddings,
        "deepstack_visual_indexes": list(spec.deepstack_blocks),
    }
    text = {
        **_text_fields(spec, tokenizer),
        "head_dim": spec.text_hidden // spec.text_heads,
        "rope_parameters": {**_rope(spec), "mrope_interleaved": True},
    }
    return Qwen3VLConfig(vision_config=vision, text_config=text, **_model_fields(spec, tokenizer))


def qwen3_processor_and_config(spec: Qwen3ArchitectureSpec):
    """The local Qwen3-VL processor for `spec` (videos: frame pairs, each announced by its timestamp) and the model
    config that matches its tokenizer."""
    tokenizer, image_processor, common = _processor_parts(spec)
    # Qwen3-VL budgets `longest_edge` over all of a video's frames; qwen-vl-utils' per-frame cap (in merged tokens)
    # holds each frame to `video_max_pixels`, as Qwen2.5-VL's per-frame bound does, for up to 768 frames.
    tokens_per_frame = spec.video_max_pixels // (spec.patch_size * spec.merge_size) ** 2
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.video_max_pixels * 768},
        max_video_tokens=tokens_per_frame,
        do_sample_frames=False,
        cap_pixels_per_frame=True,
        **common,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return processor, qwen3_model_config(spec, processor.tokenizer)
