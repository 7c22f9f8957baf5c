"""Ground-truth oracle for the synthetic world: keep the visual tokens of the objects the question is about
(then fill the budget at random). It needs each sample's relevance mask, which the caller hands the session
as `session.extras["relevance"]` (one bool array over the sample's visual tokens, or None, per row)."""

from __future__ import annotations

import torch

from covipal.errors import CovipalError
from covipal.pruning.budget import check_ratio, keep_top_visual, visual_budget
from covipal.pruning.context import LayerContext


def relevance_positions(visual: torch.Tensor, relevance: list) -> torch.Tensor:
    """[B, T] bool: per-row masks over each row's visual tokens (in order; None = nothing) in sequence positions."""
    mask = torch.zeros_like(visual)
    for row, marks in enumerate(relevance):
        positions = visual[row].nonzero().squeeze(1)
        if marks is None:
            continue
        if len(marks) != len(positions):
            raise CovipalError(f"relevance has {len(marks)} entries but the sample has {len(positions)} visual tokens")
        mask[row, positions[torch.as_tensor(marks, dtype=torch.bool, device=positions.device)]] = True
    return mask


def relevance_mask(context: LayerContext) -> torch.Tensor:
    """[B, T] bool: the visual tokens marked relevant in `context.extras["relevance"]`, in sequence positions."""
    relevance = context.extras.get("relevance")
    if relevance is None or len(relevance) != context.visual.shape[0]:
        raise CovipalError("pruner=oracle needs per-sample relevance masks; it only runs on the synthetic data")
    return relevance_positions(context.visual, relevance)


class OraclePruner:
    drop_layers = (0,)

    def __init__(self, reserve_ratio: float = 0.25, seed: int = 0):
        self.reserve_ratio = check_ratio(reserve_ratio)
        self.seed = seed
        self.generator: torch.Generator | None = None

    def setup(self, model) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def select(self, context: LayerContext) -> torch.Tensor:
        scores = torch.rand(context.visual.shape, generator=self.generator).to(context.visual.device)
        scores = scores + relevance_mask(context).float()  # relevant tokens rank first
        return keep_top_visual(scores, context.visual, visual_budget(context.n_visual, self.reserve_ratio))


class FocusPruner:
    """For training only: every relevant token plus a random `keep_ratio` share of the others (no fixed budget).
    `keep_ratio` may be a list with one ratio per sample of the batch."""

    drop_layers = (0,)

    def __init__(self, keep_ratio: float | list[float], seed: int = 0):
        ratios = keep_ratio if isinstance(keep_ratio, (list, tuple)) else [keep_ratio]
        self.reserve_ratio = [check_ratio(r, "keep_ratio") for r in ratios]
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, model) -> None:
        return None

    def select(self, context: LayerContext) -> torch.Tensor:
        chance = torch.rand(context.visual.shape, generator=self.generator).to(context.visual.device)
        ratio = torch.tensor(self.reserve_ratio, dtype=chance.dtype, device=chance.device)
        return relevance_mask(context) | (chance < ratio[:, None])
