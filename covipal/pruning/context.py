"""The pruner protocol: what a pruner is asked, and what it is shown when asked.

A pruner names the decoder layers at whose input it drops visual tokens (`drop_layers`; 0 means on the merged
input embeddings, before the LLM) and, at each of them, returns a keep mask over the current tokens
(`select`). Text and padding are never dropped: the session keeps every non-visual token whatever the mask says.
Methods that merge (VisionZip, SparseVLM's recycling, ViTCoP) return a `Merge` instead: the keep mask plus the
hidden states with each group folded into the slot that stays, so a merged token keeps one original position.
A pruner that needs more than the LLM shows (the vision tower's attention, the crop layout) may also define
`attach(model) -> list of hook handles`; the session calls it on entry and removes the handles on exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class LayerContext:
    """The current token set at the input of decoder layer `layer` (rows left-padded to equal length)."""

    layer: int
    hidden_states: torch.Tensor  # [B, T, D], input of `layer` (for layer 0: the merged input embeddings)
    previous_hidden_states: torch.Tensor | None  # input of `layer - 1`, same tokens; None at layer 0
    visual: torch.Tensor  # [B, T] bool
    attention_mask: torch.Tensor  # [B, T] bool, False for padding
    position_ids: torch.Tensor  # [B, T] original positions ([3, B, T] for M-RoPE: temporal, height, width)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # rotary (cos, sin); None at layer 0
    n_visual: torch.Tensor  # [B] visual tokens of the unpruned input
    language_model: nn.Module
    extras: dict = field(default_factory=dict)  # per-batch side information the caller gave the session
    source_index: torch.Tensor | None = None  # [B, T] each token's index in the uncompacted input sequence


@dataclass
class Merge:
    """What a merging pruner returns: the slots that stay, and the hidden states to gather them from."""

    keep: torch.Tensor  # [B, T] bool
    hidden_states: torch.Tensor  # [B, T, D]: the context's hidden states with merged groups folded into kept slots


@runtime_checkable
class Pruner(Protocol):
    reserve_ratio: float

    @property
    def drop_layers(self) -> tuple[int, ...]: ...

    def setup(self, model: nn.Module) -> None:
        """Bind to a model (check layer indices, load weights to its device). Called on session entry."""

    def select(self, context: LayerContext) -> torch.Tensor | Merge:
        """Keep mask [B, T] over `context`'s tokens (or a Merge)."""
