"""Uniform spatial pooling, a sanity baseline: each crop or frame grid is cut into as many rectangular cells as
its share of the budget, and each cell becomes one token (the mean of its tokens, or, with `mode=subsample`,
the token at its centre). Cells: horizontal bands of whole rows, each band cut along the columns.

A cell's token takes the slot (and position id) of its centre token. Newline tokens are kept only when the
budget exceeds the patch tokens."""

from __future__ import annotations

import math

import torch

from covipal.errors import CovipalError
from covipal.pruning.budget import check_ratio, split_budget
from covipal.pruning.context import LayerContext, Merge
from covipal.pruning.vision_tokens import VisionTokens, merge_per_view

MODES = ("mean", "subsample")


def grid_cells(rows: torch.Tensor, cols: torch.Tensor, cells: int) -> list[torch.Tensor]:
    """Split tokens at (rows, cols) into `cells` groups of neighbours (indices into rows/cols, each in raster
    order): bands of whole rows, then runs of columns within a band."""
    if cells <= 0:
        return []
    row_values = torch.unique(rows)
    height = len(row_values)
    width = max(1, round(len(rows) / height))
    bands = max(1, min(height, cells, round(math.sqrt(cells * height / width))))
    band_of = torch.bucketize(rows, row_values)  # row rank
    band_of = band_of * bands // height
    members = [torch.nonzero(band_of == band).squeeze(1) for band in range(bands)]
    shares = split_budget([len(m) for m in members], cells)
    groups = []
    for band, share in zip(members, shares):
        if share == 0:
            continue
        order = band[torch.argsort(cols[band] * (height + 1) + torch.bucketize(rows[band], row_values), stable=True)]
        for chunk in torch.tensor_split(order, share):
            groups.append(torch.sort(chunk).values)
    return groups


class PoolPruner:
    drop_layers = (0,)

    def __init__(self, reserve_ratio: float = 0.5, mode: str = "mean"):
        self.reserve_ratio = check_ratio(reserve_ratio)
        if mode not in MODES:
            raise CovipalError(f"pruner.mode={mode!r} is not one of {MODES}; use pruner.mode=mean or subsample")
        self.mode = mode
        self.tokens = VisionTokens(with_attention=False)

    def setup(self, model) -> None:
        return None

    def attach(self, model) -> list:
        return self.tokens.attach(model)

    def select(self, context: LayerContext) -> Merge:
        return merge_per_view(context, self.tokens.facts(), self.reserve_ratio, self._fold)

    def _fold(self, context: LayerContext, facts, b: int, positions, share: int, keep, hidden) -> None:
        for cell in grid_cells(facts.row[b, positions], facts.col[b, positions], share):
            members = positions[cell]
            centre = members[len(members) // 2]
            keep[b, centre] = True
            if self.mode == "mean":
                hidden[b, centre] = context.hidden_states[b, members].mean(0)
