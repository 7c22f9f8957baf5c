"""What each visual token of the LLM input was in the vision tower, for pruners that decide there (VisionZip,
ViTCoP's first stage, pooling).

A hook on the family's scoring layer of the tower records what that layer attended and its keys, with the layout
the model's `get_image_features` / `get_video_features` were given; the family adapter
(covipal/models/families) then lays the facts out over the LLM's visual tokens, in the model's own order:

- `view`: which grid a token belongs to — an image (or, for LLaVA-OneVision, an image's base view or its
  high-resolution grid), one video frame (or Qwen's pair of frames) — numbered per sample; -1 for newline tokens
  (and non-visual positions);
- `row`, `col`: the token's centre on its view, in [0, 1];
- `score`: the attention the token received in the tower, averaged over heads and query rows;
- `keys`: the token's key vector in that layer, averaged over heads (as VisionZip and ViTCoP compare keys).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from covipal.errors import CovipalError
from covipal.models.families import family_of
from covipal.models.families.rows import FIXED, NEWLINE
from covipal.pruning.budget import split_budget, visual_budget
from covipal.pruning.context import Merge


@dataclass
class TokenFacts:
    """Per position of a [B, T] sequence (the LLM input, before any pruning)."""

    view: torch.Tensor  # [B, T] long; -1 for newline and non-visual tokens
    row: torch.Tensor  # [B, T] float
    col: torch.Tensor  # [B, T] float
    score: torch.Tensor  # [B, T] float (0 without tower attention)
    keys: torch.Tensor | None  # [B, T, head_dim] float, or None


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
        self.family = family_of(model)
        if not self.frozen:
            self._encoded = {}
        layer = self.family.scoring_module(model)
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
        received = keys = None
        if self.with_attention or self.with_keys:
            start = time.perf_counter()
            with torch.no_grad():
                received, keys = self.family.tower_attention(module, args, kwargs)
            if received.is_cuda:
                torch.cuda.synchronize(received.device)
            self.tower_seconds += time.perf_counter() - start
        kind = "images" if caller.f_code.co_name == "get_image_features" else "videos"
        layout = self.family.tower_layout(kind, caller.f_locals)
        self._encoded[kind] = {**layout, "received": received, "keys": keys if self.with_keys else None}
        return None

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
        for kind, token_id in (("images", config.image_token_id), ("videos", config.video_token_id)):
            places = input_ids == token_id
            if not bool(places.any()):
                continue
            if kind not in encoded:
                raise CovipalError(
                    f"this pruner reads the vision tower, but the {kind} of this input were not encoded by it "
                    "(precomputed features?); pass pixels to the model or to generate()"
                )
            packed = self.family.token_rows(self.model, kind, encoded[kind], self.with_keys, input_ids.device)
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


FEATURE_FUNCTIONS = ("get_image_features", "get_video_features")


def _feature_function_frame():
    """The frame of the model's get_image_features / get_video_features that called the tower: the outermost of
    the model's own (Qwen3-VL's get_video_features calls its get_image_features; its frame says "videos" and holds
    the video layout), never a wrapper's on another module (LLaVA's ...ForConditionalGeneration)."""
    frame, found = sys._getframe(2), None
    while frame is not None:
        if frame.f_code.co_name in FEATURE_FUNCTIONS:
            owner = frame.f_locals.get("self")
            if found is not None and owner is not found.f_locals.get("self"):
                break
            found = frame
        frame = frame.f_back
    if found is None:
        raise CovipalError(
            "the vision tower ran outside the model's get_image_features / get_video_features; vision-side pruners "
            "read the image layout there"
        )
    return found


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
