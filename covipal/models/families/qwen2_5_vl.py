"""Qwen2.5-VL: a windowed ViT whose 2×2 patch merger makes each visual token, images at native resolution and
videos in pairs of frames; the LLM takes 3D rotary positions (M-RoPE: temporal, height, width) [3, B, T], and
decoding continues them from the original sequence by a per-sample `rope_deltas` the model keeps.

Tower facts for vision-side pruners: the scoring layer is the last ViT block (its output is what the merger
reads), a full-attention block in Qwen2.5-VL's layout. Its attention is taken within each image or video, as the
block computes it; the tower's patches run in window order, and the four patches of a visual token are
contiguous in it, so a token's facts are the mean of its four patches', put back in the LLM's order with the
inverse of the model's window permutation. Views: each image, and each temporal slice (a pair of frames) of a
video; row and col are the token's centre on its grid of merged tokens; no newline tokens."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from covipal.models.families.rows import VIDEO_VIEWS
from covipal.models.qwen_architecture import QwenArchitectureSpec, qwen_processor_and_config

MODEL_TYPE = "qwen2_5_vl"


class Qwen25VL:
    name = MODEL_TYPE
    spec_class = QwenArchitectureSpec
    model_class = Qwen2_5_VLForConditionalGeneration

    @staticmethod
    def from_spec(spec: dict):
        """(processor, config, spec) of a model of this family built from QwenArchitectureSpec fields."""
        built = QwenArchitectureSpec(**spec)
        return (*qwen_processor_and_config(built), built)

    @staticmethod
    def processor_problems(model, processor) -> list[str]:
        """Ways `processor` would make a number of placeholders the model does not expect."""
        vision, problems = model.config.vision_config, []
        for part in ("image_processor", "video_processor"):
            made = getattr(processor, part, None)
            if made is None:
                continue
            if made.patch_size != vision.patch_size or made.merge_size != vision.spatial_merge_size:
                problems.append(
                    f"{part} patch {made.patch_size}, merge {made.merge_size} != model's {vision.patch_size}, "
                    f"{vision.spatial_merge_size}"
                )
        return problems

    @staticmethod
    def prefill_positions(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """The LLM's prefill positions as [3, B, T]. `generate` prepends a row of text positions ([4, B, T]),
        which only serves to build masks for packed sequences; the session builds its own masks and drops it."""
        if position_ids is None:  # text only: the model lets the LLM count 0..T-1 on every axis
            position_ids = torch.arange(length, device=device)[None, None]
        elif position_ids.dim() == 2:
            position_ids = position_ids[None]
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return position_ids.expand(3, batch, length)

    @staticmethod
    def original_positions(multimodal, inputs: dict) -> torch.Tensor:
        """The M-RoPE positions [3, B, T] the model gives an input (the bench's bare reference gathers them)."""
        return multimodal.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=inputs.get("attention_mask"),
        )[0]

    @staticmethod
    def layer_position_ids(positions: torch.Tensor) -> None:
        """Decoder layers get only text positions (for packed FlashAttention); the session's explicit masks
        need none."""
        return None

    @staticmethod
    def decode_positions(multimodal, position_ids, mask, start: int, steps: int, batch: int, device):
        """Positions [3, B, steps] of new tokens after an original (unpruned) sequence of `start` tokens, or None to
        keep the call's. The text position of a new token (the real tokens before it, as the model counts them
        from the caller's `mask`, or `start + i` without one) plus the sample's rope delta, on every axis.
        `generate` passes exactly these; a forward without a mask would count the pruned cache instead, and one
        with a mask gives positions for the whole mask rather than for the new tokens."""
        if position_ids is not None and position_ids.shape[-1] == steps and mask is not None:
            return None
        if mask is not None:
            text = mask.long().cumsum(-1)[:, -steps:] - 1
        else:
            text = (torch.arange(steps, device=device) + start)[None].expand(batch, steps)
        deltas = multimodal.rope_deltas
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device) if deltas is None else deltas.to(device)
        return (text + deltas.expand(batch, 1))[None].expand(3, batch, steps)

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
        units (the grids) for `tower_work`."""
        if "pixel_values_videos" in batch:
            grids = batch["video_grid_thw"]
            out = model.model.get_video_features(batch["pixel_values_videos"], grids, return_dict=True)
            return {"video": out}, grids.tolist()
        grids = batch["image_grid_thw"]
        out = model.model.get_image_features(batch["pixel_values"], grids, return_dict=True)
        return {"image": out}, grids.tolist()

    @staticmethod
    def feature_rows(features: dict) -> torch.Tensor:
        """[n_visual, D]: the features in the order the model scatters them over its placeholders."""
        return torch.cat(next(iter(features.values())).pooler_output, dim=0)

    @staticmethod
    def tower_work(vision, units: list) -> tuple[list[tuple], float]:
        """The ViT's matrix work on `units` = grids (t, h, w in patches): layer groups (layers, tokens, hidden,
        intermediate, keys per query, gated MLP) for its full-attention blocks (each temporal slice attends to
        itself) and its windowed ones (the model's own windows), and other multiply-adds (patch embedding,
        merger)."""
        hidden, merge = vision.hidden_size, vision.spatial_merge_size
        patches = sum(t * h * w for t, h, w in units)
        full = sum(t * (h * w) ** 2 for t, h, w in units) / patches
        _, bounds = get_vision_window_index(torch.tensor(units), merge, vision.window_size, vision.patch_size)
        lengths = bounds.diff().double()  # patches per window
        windowed = float(lengths.pow(2).sum()) / patches
        blocks = len(vision.fullatt_block_indexes)
        groups = [
            (blocks, patches, hidden, vision.intermediate_size, full, True),
            (vision.depth - blocks, patches, hidden, vision.intermediate_size, windowed, True),
        ]
        embedding = patches * 3 * vision.temporal_patch_size * vision.patch_size**2 * hidden
        merged = hidden * merge * merge
        merger = patches // (merge * merge) * (merged * merged + merged * vision.out_hidden_size)
        return groups, embedding + merger

    @staticmethod
    def bench_input(processor, config, spec: dict, image, frames, question_content) -> dict:
        """Processor outputs for the bench's random image (at native resolution, within the processor's pixel
        bounds) or video."""
        if image is not None:
            text = processor.apply_chat_template(question_content("image"), add_generation_prompt=True)
            return dict(processor(text=text, images=image, return_tensors="pt"))
        text = processor.apply_chat_template(question_content("video"), add_generation_prompt=True)
        return dict(processor(text=text, videos=[frames], return_tensors="pt"))

    @staticmethod
    def video_frame_side(config) -> int:
        return 448  # the ViT's side for video frames in Qwen2.5-VL's own examples (16 x 16 tokens per frame pair)

    # -- heat maps ------------------------------------------------------------------------------------------
    @staticmethod
    def image_token_panels(model: nn.Module, processor, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Where an image of (height, width) lies in its visual tokens: one panel (start, rows, columns, stride),
        the grid of merged tokens at the resolution the processor resizes it to."""
        images = processor.image_processor
        factor = images.patch_size * images.merge_size
        bounds = images.size  # {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        new_height, new_width = smart_resize(
            height, width, factor=factor, min_pixels=bounds["shortest_edge"], max_pixels=bounds["longest_edge"]
        )
        rows, columns = new_height // factor, new_width // factor
        return [(0, rows, columns, columns)]

    @staticmethod
    def video_token_grid(model: nn.Module, processor, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames per temporal step, rows, columns) of a video's visual tokens: the grid the video processor
        gives `frames` frames of (height, width), in merged tokens; each step covers a group of frames."""
        video = np.zeros((frames, height, width, 3), dtype=np.uint8)
        steps, rows, columns = processor.video_processor(videos=[video], return_tensors="pt")["video_grid_thw"][0]
        merge = model.config.vision_config.spatial_merge_size
        return frames // int(steps), int(rows) // merge, int(columns) // merge

    # -- the vision tower's facts ------------------------------------------------------------------------------
    @staticmethod
    def scoring_module(model: nn.Module) -> nn.Module:
        return model.model.visual.blocks[-1]

    @staticmethod
    def tower_attention(block: nn.Module, args, kwargs, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention received [seq] averaged over heads and the query rows of its image, keys [seq, head_dim]
        averaged over heads) of a ViT block for its input, in the tower's (window) order."""
        hidden = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"]
        attn = block.attn
        normed = block.norm1(hidden)
        length = normed.shape[0]
        query, key, _ = attn.qkv(normed).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        query, key = rotate(query, key, cos, sin)
        query, key = query.transpose(0, 1).float(), key.transpose(0, 1).float()  # [heads, seq, d]
        received = torch.zeros(length, dtype=torch.float32, device=hidden.device)
        bounds = cu_seqlens.tolist()
        for begin, end in zip(bounds[:-1], bounds[1:]):
            keys = key[:, begin:end]
            for start in range(begin, end, chunk):
                rows = query[:, start : min(start + chunk, end)]
                probabilities = torch.softmax(rows @ keys.transpose(-1, -2) * attn.scaling, dim=-1)
                received[begin:end] += probabilities.sum(dim=(0, 1)) / (attn.num_heads * (end - begin))
        return received, key.mean(0)

    @staticmethod
    def tower_layout(kind: str, found: dict) -> dict:
        """The grids (t, h, w in patches) the model's get_image_features / get_video_features were given."""
        return {"grid_thw": found["image_grid_thw" if kind == "images" else "video_grid_thw"]}

    @staticmethod
    def tower_to_llm_order(vision, grids: torch.Tensor, device) -> torch.Tensor:
        """Indices that put the tower's merged tokens (its window order) in the LLM's order."""
        window_index, _ = get_vision_window_index(
            grids, vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        return torch.argsort(window_index.to(device))

    @classmethod
    def token_rows(cls, model: nn.Module, kind: str, encoded: dict, with_keys: bool, device) -> torch.Tensor:
        """[n, 4 (+ key width)] rows of view, row, col, score (, key) for the LLM's tokens of `kind`, in order."""
        vision = model.config.vision_config
        grids = encoded["grid_thw"]
        merge = vision.spatial_merge_size
        order = cls.tower_to_llm_order(vision, grids, device)

        def per_token(values: torch.Tensor) -> torch.Tensor:  # [seq, ...] patches -> [tokens, ...] in LLM order
            return values.reshape(-1, merge * merge, *values.shape[1:]).mean(1)[order]

        parts, view = [], 0 if kind == "images" else VIDEO_VIEWS
        for t, h, w in grids.tolist():
            height, width = h // merge, w // merge
            rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
            cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
            for _ in range(t):
                place = torch.stack(
                    [
                        torch.full((height * width,), float(view), device=device),
                        rows[:, None].expand(height, width).reshape(-1),
                        cols[None, :].expand(height, width).reshape(-1),
                    ],
                    dim=-1,
                )
                parts.append(place)
                view += 1
        places = torch.cat(parts)
        received = encoded["received"]
        score = per_token(received.to(device)) if received is not None else torch.zeros(len(places), device=device)
        columns = [places, score[:, None]]
        if with_keys:
            columns.append(per_token(encoded["keys"].to(device)))
        return torch.cat(columns, dim=-1)


ADAPTER = Qwen25VL()
