"""FastV: layers 0..K-1 see every token; the last token's attention at layer K-1 (mean over heads) ranks the
visual tokens, and only the top ones enter layer K. The row is recomputed, so any attention kernel works."""

from __future__ import annotations

import math

import torch

from covipal.errors import CovipalError
from covipal.pruning.budget import check_ratio, keep_top_visual, visual_budget
from covipal.pruning.context import LayerContext
from covipal.pruning.scoring import attention_rows, last_real_index


def fastv_keep_fraction(reserve_ratio: float, num_layers: int, K: int) -> float:
    """Fraction kept after layer K so that the average over all layers is `reserve_ratio`: (rL − K)/(L − K).
    At r = K/L it is 0, and the budget's floor of one token per sample leaves layers from K on one visual token
    each (the tiny model's 4 layers with K=1 at r = 0.25: [336, 1, 1, 1] for a 336-token image)."""
    fraction = (reserve_ratio * num_layers - K) / (num_layers - K)
    if fraction < -1e-9:
        feasible = math.ceil(K / num_layers * 100) / 100
        raise CovipalError(
            f"fastv with K={K} on {num_layers} layers cannot average pruner.reserve_ratio={reserve_ratio}; "
            f"use pruner.reserve_ratio>={feasible} or a smaller pruner.K"
        )
    return max(fraction, 0.0)


class FastVPruner:
    def __init__(self, reserve_ratio: float = 0.5, K: int = 2, R: float | None = None):
        """K: the layer before which tokens are dropped. R: fraction of visual tokens dropped at K; when None it is
        solved from `reserve_ratio` (the average over all layers, see BASELINES.md)."""
        self.reserve_ratio = check_ratio(reserve_ratio)
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise CovipalError(f"pruner.K={K!r} must be an integer >= 1 (FastV scores with layer K-1's attention)")
        if R is not None and not 0.0 <= R < 1.0:
            raise CovipalError(f"pruner.R={R!r} is the fraction dropped at layer K and must lie in [0, 1)")
        self.K = K
        self.R = R
        self.keep_fraction: float | None = None

    @property
    def drop_layers(self) -> tuple[int, ...]:
        return (self.K,)

    def setup(self, model) -> None:
        num_layers = model.config.text_config.num_hidden_layers
        if self.K >= num_layers:
            raise CovipalError(f"pruner.K={self.K} is not below the LLM's {num_layers} layers; pick K < {num_layers}")
        if self.R is None:
            self.keep_fraction = fastv_keep_fraction(self.reserve_ratio, num_layers, self.K)
        else:
            self.keep_fraction = 1.0 - self.R

    def scores(self, context: LayerContext) -> torch.Tensor:
        """Mean over heads of layer K-1's attention from the last real token, [B, T]."""
        layer = context.language_model.layers[context.layer - 1]
        rows = attention_rows(
            layer,
            context.previous_hidden_states,
            context.position_embeddings,
            context.attention_mask,
            last_real_index(context.attention_mask),
        )
        return rows.mean(1)[:, 0]

    def select(self, context: LayerContext) -> torch.Tensor:
        budget = visual_budget(context.n_visual, self.keep_fraction)
        return keep_top_visual(self.scores(context), context.visual, budget)
