"""Random pruning, a sanity baseline: keep a seeded uniformly random floor(r · n_v) visual tokens per sample."""

from __future__ import annotations

import torch

from covipal.pruning.budget import check_ratio, keep_top_visual, visual_budget
from covipal.pruning.context import LayerContext


class RandomPruner:
    drop_layers = (0,)

    def __init__(self, reserve_ratio: float = 0.5, seed: int = 0):
        self.reserve_ratio = check_ratio(reserve_ratio)
        self.seed = seed
        self.generator: torch.Generator | None = None

    def setup(self, model) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)  # a new session replays the same draws

    def select(self, context: LayerContext) -> torch.Tensor:
        scores = torch.rand(context.visual.shape, generator=self.generator).to(context.visual.device)
        return keep_top_visual(scores, context.visual, visual_budget(context.n_visual, self.reserve_ratio))
