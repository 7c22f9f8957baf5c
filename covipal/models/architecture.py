"""A LLaVA-OneVision architecture of any size from a spec, with the local word tokenizer: transformers' own classes
and config, built with no download. The tiny model (covipal/tiny_world/model.py) and the real-shape bench models
(covipal/models/shapes.py) are both built from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from covipal.models.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, build_word_tokenizer


@dataclass
class ArchitectureSpec:
    """Sizes of the model. `image_size`/`patch_size` set tokens per crop ((image_size/patch_size)²); `words`: extra
    whole words for the local tokenizer; `seed`: the weights' seed."""

    image_size: int = 32
    patch_size: int = 8
    grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96]]
    )
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 12
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int = -1  # -(layers+1) = the patch embeddings (each token sees only its own patch)
    initializer_range: float = 0.02
    words: list[str] = field(default_factory=list)
    seed: int = 0


def model_config(spec: ArchitectureSpec, vocab_size: int, image_token_id: int, video_token_id: int):
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    vision.initializer_range = spec.initializer_range
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        initializer_range=spec.initializer_range,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        image_grid_pinpoints=spec.grid_pinpoints,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=spec.vision_aspect_ratio,
        tie_word_embeddings=True,
        initializer_range=spec.initializer_range,
    )


def local_processor(spec: ArchitectureSpec) -> LlavaOnevisionProcessor:
    tokenizer = build_word_tokenizer(spec.words)
    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=spec.grid_pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
        vision_aspect_ratio=spec.vision_aspect_ratio,
    )


def processor_and_config(spec: ArchitectureSpec):
    """The local processor for `spec` and the model config that matches its tokenizer (placeholders, pad, eos)."""
    processor = local_processor(spec)
    tok = processor.tokenizer
    config = model_config(
        spec, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(VIDEO_TOKEN)
    )
    config.text_config.pad_token_id = tok.pad_token_id
    config.text_config.eos_token_id = tok.eos_token_id
    return processor, config


def set_generation_tokens(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
