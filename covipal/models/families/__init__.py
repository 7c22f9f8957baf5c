"""Model families: what the pruning session, the pruners and the harnesses need to know about a model, one module
per family (`llava_onevision`, `qwen2_5_vl`, `qwen3_vl`). Outside these modules no code names a family; it asks
`family_of(model)` for the adapter of the model in hand."""

from __future__ import annotations

import torch
from torch import nn

from covipal.errors import CovipalError
from covipal.models.families import llava_onevision, qwen2_5_vl, qwen3_vl

FAMILIES = {module.MODEL_TYPE: module.ADAPTER for module in (llava_onevision, qwen2_5_vl, qwen3_vl)}


def family_of(model: nn.Module):
    """The adapter of `model`'s family (by its config's model_type)."""
    model_type = getattr(model.config, "model_type", None)
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise CovipalError(
            f"covipal has no adapter for model_type={model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return adapter


def family_named(model_type: str):
    """The adapter of a family by its model_type (configs name it for models built from a spec)."""
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise CovipalError(f"model family {model_type!r} is not one of {', '.join(sorted(FAMILIES))}")
    return adapter


def visual_mask(config, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions of image and video placeholders (one per visual token the LLM sees)."""
    return (input_ids == config.image_token_id) | (input_ids == config.video_token_id)
