"""The unpruned baseline: installs the bookkeeping (per-layer counts) and changes nothing."""

from __future__ import annotations

import torch

from covipal.pruning.context import LayerContext


class NoPruner:
    drop_layers: tuple[int, ...] = ()

    def __init__(self, reserve_ratio: float = 1.0):
        self.reserve_ratio = 1.0  # the sweep may pass any ratio; an unpruned model keeps everything

    def setup(self, model) -> None:
        return None

    def select(self, context: LayerContext) -> torch.Tensor:
        return torch.ones_like(context.visual)
