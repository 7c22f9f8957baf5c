"""What each visual token of the LLM input was in the vision tower, for pruners that decide there (VisionZip,
ViTCoP's first stage, pooling).

Per crop or frame the tower gives a grid of tokens; the LLM sees them after the model's own packing: anyres
unpadding (and, for large images, bilinear down-sampling), newline tokens, video pooling. Rather than re-derive
that layout, per-token facts are written as channels of a per-crop tensor and pushed through the model's own
`pack_image_features` / `apply_pooling`, which place each channel exactly where the features go. The facts:

- `view`: which grid a token belongs to — an image's base view, an image's high-resolution grid, or one video
  frame — numbered per sample; -1 for newline tokens (and non-visual positions);
- `row`, `col`: the token's centre on its view, in [0, 1];
- `score`: the attention the token received in the tower, averaged over heads and query rows (SigLIP has no CLS
  token, so this is the importance VisionZip and ViTCoP use for it);
- `keys`: the token's key vector in that layer, averaged over heads (as VisionZip and ViTCoP compare keys).

The tower layer is the one that produced the features the projector reads (`vision_feature_layer`); when those
are the patch embeddings themselves (no layer produced them), the first layer, which reads them, is used.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from covipal.errors import CovipalError
from covipal.pruning.budget import split_budget, visual_budget
from covipal.pruning.context import Merge

FIXED = 4  # channels before the keys: view, row, col, score
NEWLINE = -1.0
VIDEO_VIEWS = 1_000_000  # frame views are numbered from here, image views from 0 (exact in float32)


@dataclass
class TokenFacts:
    """Per position of a [B, T] sequence (the LLM input, before any pruning)."""

    view: torch.Tensor  # [B, T] long; -1 for newline and non-visual tokens
    row: torch.Tensor  # [B, T] float
    col: torch.Tensor  # [B, T] float
    score: torch.Tensor  # [B, T] float (0 without tower attention)
    keys: torch.Tensor | None  # [B, T, head_dim] float, or None


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


class VisionTokens:
    """Hooks that record the tower facts of one forward; `facts(...)` lays them out over the LLM input."""

    def __init__(self, with_attention: bool = True, with_keys: bool = False):
        self.with_attention = with_attention
        self.with_keys = with_keys
        self.model: nn.Module | None = None
        self._input_ids: torch.Tensor | None = None
        self._encoded: dict[str, dict] = {}  # "images" / "videos" -> what the tower saw of the current input
        # The efficiency harness times the LLM on precomputed features: it records the tower's facts once with a
        # full forward, then freezes them for later calls on the same input.
        self.frozen = False
        self.tower_seconds = 0.0  # time spent recomputing the tower layer's attention (the method's own cost)

    def attach(self, model: nn.Module) -> list:
        self.model = model
        if not self.frozen:
            self._encoded = {}
        layer = model.model.vision_tower.encoder.layers[scoring_layer(model)]
        return [
            model.model.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            layer.register_forward_pre_hook(self._record_tower, with_kwargs=True),
        ]

    def _record_inputs(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            return None  # a decoding step: the prefill's facts stay
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.frozen and self._input_ids is not None and input_ids is not None:
            if input_ids.shape != self._input_ids.shape:
                raise CovipalError("frozen tower facts belong to another input; record them again")
        self._input_ids = input_ids
        return None

    def _record_tower(self, module, args, kwargs):
        """The tower runs inside the model's `get_image_features` / `get_video_features` — called by the forward,
        or by `generate()` before the first forward, which then gets only the features. The layout those
        functions are given (image sizes, images per sample, frames per video) is read from their frame."""
        if self.frozen and self._encoded:
            return None
        caller = _feature_function_frame()
        hidden = args[0] if args else kwargs["hidden_states"]
        received = keys = None
        if self.with_attention or self.with_keys:
            start = time.perf_counter()
            with torch.no_grad():
                received, keys = tower_attention(module, hidden)
            if hidden.is_cuda:
                torch.cuda.synchronize(hidden.device)
            self.tower_seconds += time.perf_counter() - start
        found = caller.f_locals
        if caller.f_code.co_name == "get_image_features":
            self._encoded["images"] = {
                "image_sizes": found["image_sizes"],
                "batch_num_images": found.get("batch_num_images"),
                "received": received,
                "keys": keys if self.with_keys else None,
            }
        else:
            self._encoded["videos"] = {
                "shape": (int(found["batch_size"]), int(found["frames"])),  # locals of get_video_features
                "received": received,
                "keys": keys if self.with_keys else None,
            }
        return None

    # -- layout -----------------------------------------------------------------------------------------------
    def _channels(self, crops: int, side: int, received, keys, views: torch.Tensor, grid=None) -> torch.Tensor:
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
        if self.with_keys:
            channels.append(keys.float())
        return torch.cat(channels, dim=-1)

    def _image_channels(self, encoded: dict) -> list[torch.Tensor]:
        model, config = self.model, self.model.config
        received, keys = encoded["received"], encoded["keys"]
        sizes = encoded["image_sizes"]
        counts = encoded["batch_num_images"]
        patching = [True] * len(sizes) if counts is None else [n == 1 for n in counts for _ in range(n)]
        crop_counts = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if patch
            else 1
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
                self._channels(
                    crops,
                    side,
                    None if received is None else received[piece],
                    None if keys is None else keys[piece],
                    views,
                    grid,
                )
            )
            start += crops
        sentinel = self._sentinel(per_image[0])
        packed, _ = model.model.pack_image_features(
            per_image, sizes, image_newline=sentinel, vision_aspect_ratio=config.vision_aspect_ratio
        )
        return packed

    def _video_channels(self, encoded: dict) -> list[torch.Tensor]:
        model, config = self.model, self.model.config
        received, keys = encoded["received"], encoded["keys"]
        videos, frames = encoded["shape"]
        side = config.vision_config.image_size // config.vision_config.patch_size
        views = VIDEO_VIEWS + torch.arange(videos * frames, device=self._input_ids.device)
        channels = self._channels(videos * frames, side, received, keys, views)
        pooled = model.model.apply_pooling(channels)  # the same bilinear pooling the features get
        pooled = pooled.reshape(videos, -1, pooled.shape[-1])
        sentinel = self._sentinel(pooled)
        return [torch.cat([video, sentinel[None]], dim=0) for video in pooled]

    @staticmethod
    def _sentinel(like: torch.Tensor) -> torch.Tensor:
        sentinel = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
        sentinel[:3] = NEWLINE
        return sentinel

    def facts(self) -> TokenFacts:
        """The current input's facts over its [B, T] positions. The record is used up (a later input encodes its
        own), unless frozen."""
        if self._input_ids is None:
            raise CovipalError("this pruner reads the vision tower; call the model with input_ids")
        input_ids = self._input_ids
        config = self.model.config
        encoded = self._encoded
        if not self.frozen:
            self._encoded = {}
        keys_width = next((e["keys"].shape[-1] for e in encoded.values() if e["keys"] is not None), 0)
        table = torch.zeros(*input_ids.shape, FIXED + keys_width, device=input_ids.device)
        table[..., :3] = NEWLINE
        for kind, token_id, build in (
            ("images", config.image_token_id, self._image_channels),
            ("videos", config.video_token_id, self._video_channels),
        ):
            places = input_ids == token_id
            if not bool(places.any()):
                continue
            if kind not in encoded:
                raise CovipalError(
                    f"this pruner reads the vision tower, but the {kind} of this input were not encoded by it "
                    "(precomputed features?); pass pixels to the model or to generate()"
                )
            packed = torch.cat(build(encoded[kind]), dim=0)
            if int(places.sum()) != packed.shape[0]:
                raise CovipalError(f"{int(places.sum())} {kind} placeholders but {packed.shape[0]} packed tokens")
            table[places] = packed.to(table.dtype)
        return TokenFacts(
            view=table[..., 0].round().long(),
            row=table[..., 1],
            col=table[..., 2],
            score=table[..., 3],
            keys=table[..., FIXED:] if self.with_keys else None,
        )


def _feature_function_frame():
    """The frame of the model's get_image_features / get_video_features that called the tower."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in ("get_image_features", "get_video_features") and (
            "image_sizes" in frame.f_locals or "frames" in frame.f_locals
        ):
            return frame
        frame = frame.f_back
    raise CovipalError(
        "the vision tower ran outside the model's get_image_features / get_video_features; vision-side pruners "
        "read the image layout there"
    )


def merge_per_view(context, facts: TokenFacts, ratio: float, fold) -> Merge:
    """The shared loop of per-crop/frame methods: floor(ratio · n_v) per sample, split over its views by size;
    `fold(context, facts, b, positions, share, keep, hidden)` marks a view's kept slots in `keep` and writes
    their merged states into `hidden` (a copy of the context's, so reads from the context see unmerged rows)."""
    budget = visual_budget(context.n_visual, ratio)
    keep = ~context.visual
    hidden = context.hidden_states.clone()
    for b in range(keep.shape[0]):
        views, shares, newlines = budget_over_views(context.visual[b], facts.view[b], int(budget[b]))
        keep[b, newlines] = True
        for positions, share in zip(views, shares):
            fold(context, facts, b, positions, share, keep, hidden)
    return Merge(keep, hidden)


def budget_over_views(visual: torch.Tensor, view: torch.Tensor, total: int):
    """One sample's budget split over its views by size: (views, shares, newline positions to keep). Newline
    tokens take only what is left when the budget exceeds the patch tokens."""
    views = view_groups(torch.where(visual, view, torch.full_like(view, -1)))
    shares = split_budget([len(positions) for positions in views], total)
    spare = total - sum(shares)
    newlines = torch.nonzero(visual & (view < 0)).squeeze(1)[: max(spare, 0)]
    return views, shares, newlines


def view_groups(view: torch.Tensor) -> list[torch.Tensor]:
    """Positions [n_i] of each view of one sample's `view` row, in order of first appearance (newlines excluded)."""
    order = dict.fromkeys(view[view >= 0].tolist())
    return [torch.nonzero(view == label).squeeze(1) for label in order]
