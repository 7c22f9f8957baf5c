"""Qwen3-VL: Qwen2.5-VL's layout (2×2 merged patches at native resolution, videos in frame pairs, M-RoPE positions
[3, B, T] continued by `rope_deltas`; the rotary sections interleaved, which the model's own rotary embedding
handles) with three differences the adapter knows:

- DeepStack: the merged outputs of some ViT blocks are added to the visual tokens' hidden states after each of the
  first LLM layers (`visual_pos_masks`, `deepstack_visual_embeds` in the LLM's call). Once tokens are pruned those
  masks no longer fit the sequence, so the session takes them out of the call (`split_layer_inputs`) and adds
  each kept token's own inputs after those layers itself; a pruned token's DeepStack inputs go with it, and a
  merged token takes those of the member whose position it keeps.
- The ViT has no windows: its merged tokens come out in the LLM's order, every block attends within each image
  or frame pair, and its MLP is not gated (FLOPs).
- A video's frame pairs are separated by timestamp text in the prompt (the processor writes them): its visual
  tokens are not contiguous, which nothing here assumes anyway."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration

from covipal.models.families.qwen2_5_vl import Qwen25VL
from covipal.models.qwen_architecture import Qwen3ArchitectureSpec, qwen3_processor_and_config

MODEL_TYPE = "qwen3_vl"
LAYER_INPUTS = ("visual_pos_masks", "deepstack_visual_embeds")


class Qwen3VL(Qwen25VL):
    name = MODEL_TYPE
    spec_class = Qwen3ArchitectureSpec
    model_class = Qwen3VLForConditionalGeneration

    @staticmethod
    def from_spec(spec: dict):
        """(processor, config, spec) of a model of this family built from Qwen3ArchitectureSpec fields."""
        built = Qwen3ArchitectureSpec(**spec)
        return (*qwen3_processor_and_config(built), built)

    @staticmethod
    def injected_layers(model: nn.Module) -> int:
        """How many of the first LLM layers get DeepStack inputs added to their output."""
        return len(model.config.vision_config.deepstack_visual_indexes)

    @staticmethod
    def split_layer_inputs(kwargs: dict) -> tuple[dict, tuple[torch.Tensor, list[torch.Tensor]] | None]:
        """(the LLM's call without DeepStack's inputs, (visual_pos_masks [B, T], [per layer: embeds [n_visual, D]
        in the mask's row-major order]) or None when the call has none, as in decoding)."""
        if kwargs.get("deepstack_visual_embeds") is None:
            return {k: v for k, v in kwargs.items() if k not in LAYER_INPUTS}, None
        inputs = (kwargs["visual_pos_masks"], list(kwargs["deepstack_visual_embeds"]))
        return {k: v for k, v in kwargs.items() if k not in LAYER_INPUTS}, inputs

    @staticmethod
    def tower_to_llm_order(vision, grids: torch.Tensor, device) -> torch.Tensor:
        """No windows: the tower's merged tokens are already in the LLM's order."""
        count = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum()) // vision.spatial_merge_size**2
        return torch.arange(count, device=device)

    @staticmethod
    def tower_work(vision, units: list) -> tuple[list[tuple], float]:
        """The ViT's matrix work on `units` = grids (t, h, w in patches): one layer group (every block attends
        within each temporal slice; MLP not gated), and other multiply-adds (patch embedding, the merger and the
        DeepStack mergers; the learned position grid's resampling is four lookups per patch and left out)."""
        hidden, merge = vision.hidden_size, vision.spatial_merge_size
        patches = sum(t * h * w for t, h, w in units)
        full = sum(t * (h * w) ** 2 for t, h, w in units) / patches
        groups = [(vision.depth, patches, hidden, vision.intermediate_size, full, False)]
        embedding = patches * 3 * vision.temporal_patch_size * vision.patch_size**2 * hidden
        merged = hidden * merge * merge
        mergers = 1 + len(vision.deepstack_visual_indexes)
        merger = mergers * patches // (merge * merge) * (merged * merged + merged * vision.out_hidden_size)
        return groups, embedding + merger


ADAPTER = Qwen3VL()
