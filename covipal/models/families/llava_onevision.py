"""LLaVA-OneVision (and LLaVA-Video, the same classes): SigLIP tower, anyres crops with newline tokens, video
frames pooled 2×2; the LLM (Qwen2) takes 1D positions [B, T].

Tower facts for vision-side pruners: the scoring layer is the one that produced the features the projector reads
(`vision_feature_layer`; when those are the patch embeddings, the first layer, which reads them). Rather than
re-derive the LLM's layout of crops (anyres unpadding, down-sampling of large images, newline tokens, video
pooling), per-token facts are written as channels of a per-crop tensor and pushed through the model's own
`pack_image_features` / `apply_pooling`, which place each channel exactly where the features go."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from covipal.models.architecture import ArchitectureSpec, processor_and_config
from covipal.models.families.rows import NEWLINE, VIDEO_VIEWS

MODEL_TYPE = "llava_onevision"


class LlavaOneVision:
    name = MODEL_TYPE
    spec_class = ArchitectureSpec
    model_class = LlavaOnevisionForConditionalGeneration

    @staticmethod
    def from_spec(spec: dict):
        """(processor, config, spec) of a model of this family built from ArchitectureSpec fields."""
        built = ArchitectureSpec(**spec)
        return (*processor_and_config(built), built)

    @staticmethod
    def processor_problems(model, processor) -> list[str]:
        """Ways `processor` would make a number of placeholders the model does not expect."""
        vision = model.config.vision_config
        expected = (vision.image_size // vision.patch_size) ** 2
        if processor.num_image_tokens != expected:
            return [f"{processor.num_image_tokens} tokens per crop != model's {expected}"]
        return []

    @staticmethod
    def prefill_positions(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """The LLM's prefill positions as [B, T] (the model passes none: 0..T-1)."""
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]
        return position_ids.expand(batch, length)

    @staticmethod
    def original_positions(multimodal, inputs: dict) -> torch.Tensor:
        """The positions [B, T] the model gives an unpadded input (the bench's bare reference gathers them)."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)

    @staticmethod
    def layer_position_ids(positions: torch.Tensor) -> torch.Tensor:
        """What a decoder layer is given as `position_ids` for a stage with these positions."""
        return positions

    @staticmethod
    def decode_positions(multimodal, position_ids, mask, start: int, steps: int, batch: int, device):
        """Positions [B, steps] of new tokens after an original (unpruned) sequence of `start` tokens, or None to
        keep the call's `position_ids`. The model would count the pruned cache, so positions it did not get from
        the caller (generate passes them) continue the original length."""
        if position_ids is not None:
            return None
        return (torch.arange(steps, device=device) + start)[None].expand(batch, steps)

    @staticmethod
    def injected_layers(model: nn.Module) -> int:
        """How many of the first LLM layers get visual inputs added to their output (Qwen3-VL's DeepStack): none."""
        return 0

    @staticmethod
    def split_layer_inputs(kwargs: dict) -> tuple[dict, None]:
        """(the LLM's call without its per-layer visual inputs, those inputs): none here."""
        return kwargs, None

    # -- the efficiency harness --------------------------------------------------------------------------------
    @staticmethod
    def encode_vision(model: nn.Module, batch: dict) -> tuple[dict, list]:
        """The tower's features of a processor batch, as the forward's `mm_encoder_outputs`, and the tower's work
        units (crops and frames) for `tower_work`."""
        if "pixel_values_videos" in batch:
            videos = batch["pixel_values_videos"]
            features = {"video": model.model.get_video_features(videos, return_dict=True)}
            return features, [videos.shape[0] * videos.shape[1]]
        out = model.model.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            batch_num_images=batch.get("batch_num_images"),
            return_dict=True,
        )
        return {"image": out}, [batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]]

    @staticmethod
    def feature_rows(features: dict) -> torch.Tensor:
        """[n_visual, D]: the features in the order the model scatters them over its placeholders."""
        if "image" in features:
            return torch.cat(features["image"].pooler_output, dim=0)
        return features["video"].pooler_output.flatten(0, 1)

    @staticmethod
    def tower_work(vision, units: list) -> tuple[list[tuple], float]:
        """The tower's matrix work on `units` = [crops]: layer groups (layers, tokens, hidden, intermediate, keys
        per query, gated MLP) and other multiply-adds (the patch embedding)."""
        crops = units[0]
        n = (vision.image_size // vision.patch_size) ** 2
        hidden = vision.hidden_size
        layers = (vision.num_hidden_layers, crops * n, hidden, vision.intermediate_size, n, False)
        return [layers], crops * n * hidden * 3 * vision.patch_size**2

    @staticmethod
    def bench_input(processor, config, spec: dict, image, frames, question_content) -> dict:
        """Processor outputs for the bench's random image (anyres aspect from `spec`) or video."""
        if image is not None:
            aspect = spec.get("aspect")
            if aspect:  # as training and the paper's efficiency figures use it (set on this model instance)
                config.vision_aspect_ratio = aspect
                processor.vision_aspect_ratio = aspect
            text = processor.apply_chat_template(question_content("image"), add_generation_prompt=True)
            return dict(processor(text=text, images=image, return_tensors="pt"))
        text = processor.apply_chat_template(question_content("video"), add_generation_prompt=True)
        return dict(processor(text=text, videos=[frames], return_tensors="pt"))

    @staticmethod
    def video_frame_side(config) -> int:
        return config.vision_config.image_size

    # -- heat maps ------------------------------------------------------------------------------------------
    @staticmethod
    def image_token_panels(model: nn.Module, processor, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Where an image of (height, width) lies in its visual tokens, as panels (start, rows, columns, stride):
        the base view, then the high-resolution grid if there is one (rows closed by a newline, stride = columns
        + 1), read off the model's own packing of placeholder features."""
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        grid_h, grid_w = get_anyres_image_grid_shape(
            (height, width), config.image_grid_pinpoints, config.vision_config.image_size
        )
        placeholder = torch.zeros(1 + grid_h * grid_w, side * side, 1)
        packed, _ = model.model.pack_image_features(
            [placeholder],
            torch.tensor([(height, width)]),
            image_newline=torch.ones(1),
            vision_aspect_ratio=config.vision_aspect_ratio,
        )
        newlines = torch.nonzero(packed[0][side * side :, 0] == 1).squeeze(1)
        panels = [(0, side, side, side)]
        if len(newlines):
            columns = int(newlines[0])
            panels.append((side * side, len(newlines), columns, columns + 1))
        return panels

    @staticmethod
    def video_token_grid(model: nn.Module, processor, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames per temporal step, rows, columns) of a video's visual tokens: one step per frame, each frame at
        the tower's side and pooled by the model's own `apply_pooling` (the video's one newline follows them)."""
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        pooled = model.model.apply_pooling(torch.zeros(1, side * side, 1)).shape[1]
        return 1, math.isqrt(pooled), math.isqrt(pooled)

    # -- the vision tower's facts ------------------------------------------------------------------------------
    @staticmethod
    def scoring_module(model: nn.Module) -> nn.Module:
        return model.model.vision_tower.encoder.layers[scoring_layer(model)]

    @staticmethod
    def tower_attention(layer: nn.Module, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = args[0] if args else kwargs["hidden_states"]
        return tower_attention(layer, hidden)

    @staticmethod
    def tower_layout(kind: str, found: dict) -> dict:
        """What the model's get_image_features / get_video_features (locals `found`) were given."""
        if kind == "images":
            return {"image_sizes": found["image_sizes"], "batch_num_images": found.get("batch_num_images")}
        return {"shape": (int(found["batch_size"]), int(found["frames"]))}

    @staticmethod
    def token_rows(model: nn.Module, kind: str, encoded: dict, with_keys: bool, device) -> torch.Tensor:
        """[n, 4 (+ key width)] rows of view, row, col, score (, key) for the LLM's tokens of `kind`, in order."""
        build = _image_channels if kind == "images" else _video_channels
        return torch.cat(build(model, encoded, with_keys, device), dim=0)


ADAPTER = LlavaOneVision()


def scoring_layer(model: nn.Module) -> int:
    """Index of the tower layer whose attention scores the features the projector reads."""
    layers = len(model.model.vision_tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer
    if not isinstance(feature_layer, int):
        feature_layer = feature_layer[-1]
    hidden_index = feature_layer % (layers + 1)  # hidden_states[0] = embeddings, [i] = output of layer i-1
    return max(hidden_index - 1, 0)


def tower_attention(layer: nn.Module, hidden: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention received [N, n] averaged over heads and query rows, keys [N, n, head_dim] averaged over heads)
    of a SigLIP encoder layer for its input `hidden` [N, n, D]; query rows are taken `chunk` at a time."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    crops, length, _ = normed.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    key = attn.k_proj(normed).view(crops, length, heads, head_dim).transpose(1, 2).float()
    received = torch.zeros(crops, length, dtype=torch.float32, device=hidden.device)
    for start in range(0, length, chunk):
        rows = normed[:, start : start + chunk]
        query = attn.q_proj(rows).view(crops, rows.shape[1], heads, head_dim).transpose(1, 2).float()
        probabilities = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)
        received += probabilities.sum(dim=(1, 2))
    return received / (heads * length), key.mean(1)


def _channels(crops: int, side: int, received, keys, views: torch.Tensor, with_keys: bool, grid=None) -> torch.Tensor:
    """[crops, side², C] per-crop channels; `grid[c]` = (row offset, col offset, rows, cols) in crop units."""
    device = views.device
    index = torch.arange(side, device=device, dtype=torch.float32)
    rows = index[:, None].expand(side, side).reshape(-1)
    cols = index[None, :].expand(side, side).reshape(-1)
    parts = []
    for crop in range(crops):
        r0, c0, n_rows, n_cols = grid[crop] if grid is not None else (0, 0, 1, 1)
        row = (r0 * side + rows + 0.5) / (n_rows * side)
        col = (c0 * side + cols + 0.5) / (n_cols * side)
        parts.append(torch.stack([views[crop].float().expand(side * side), row, col], dim=-1))
    channels = [torch.stack(parts)]
    score = received if received is not None else torch.zeros(crops, side * side, device=device)
    channels.append(score[..., None].float())
    if with_keys:
        channels.append(keys.float())
    return torch.cat(channels, dim=-1)


def _image_channels(model: nn.Module, encoded: dict, with_keys: bool, device) -> list[torch.Tensor]:
    config = model.config
    received, keys = encoded["received"], encoded["keys"]
    sizes = encoded["image_sizes"]
    counts = encoded["batch_num_images"]
    patching = [True] * len(sizes) if counts is None else [n == 1 for n in counts for _ in range(n)]
    crop_counts = [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if patch else 1
        for size, patch in zip(sizes, patching)
    ]
    side = config.vision_config.image_size // config.vision_config.patch_size
    per_image, start = [], 0
    for image, crops in enumerate(crop_counts):
        grid = [(0, 0, 1, 1)]
        if crops > 1:
            grid_h, grid_w = get_anyres_image_grid_shape(
                sizes[image], config.image_grid_pinpoints, config.vision_config.image_size
            )
            grid += [(i // grid_w, i % grid_w, grid_h, grid_w) for i in range(crops - 1)]
        views = torch.tensor([2 * image] + [2 * image + 1] * (crops - 1), device=sizes.device)
        piece = slice(start, start + crops)
        per_image.append(
            _channels(
                crops,
                side,
                None if received is None else received[piece],
                None if keys is None else keys[piece],
                views,
                with_keys,
                grid,
            )
        )
        start += crops
    sentinel = _sentinel(per_image[0])
    packed, _ = model.model.pack_image_features(
        per_image, sizes, image_newline=sentinel, vision_aspect_ratio=config.vision_aspect_ratio
    )
    return packed


def _video_channels(model: nn.Module, encoded: dict, with_keys: bool, device) -> list[torch.Tensor]:
    config = model.config
    received, keys = encoded["received"], encoded["keys"]
    videos, frames = encoded["shape"]
    side = config.vision_config.image_size // config.vision_config.patch_size
    views = VIDEO_VIEWS + torch.arange(videos * frames, device=device)
    channels = _channels(videos * frames, side, received, keys, views, with_keys)
    pooled = model.model.apply_pooling(channels)  # the same bilinear pooling the features get
    pooled = pooled.reshape(videos, -1, pooled.shape[-1])
    sentinel = _sentinel(pooled)
    return [torch.cat([video, sentinel[None]], dim=0) for video in pooled]


def _sentinel(like: torch.Tensor) -> torch.Tensor:
    sentinel = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    sentinel[:3] = NEWLINE
    return sentinel
