"""Budgets: how many visual tokens a sample keeps, and the top-k selection every score-based pruner shares."""

from __future__ import annotations

import torch

from covipal.errors import CovipalError


def check_ratio(ratio: float, name: str = "pruner.reserve_ratio") -> float:
    """Validate a keep ratio in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise CovipalError(
            f"{name}={ratio!r} is outside (0, 1]; pass a fraction of visual tokens to keep, e.g. {name}=0.25"
        )
    return float(ratio)


def visual_budget(n_visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """floor(ratio · n_v) per sample, at least 1 for samples that have visual tokens (0 for those that have none).

    A tiny epsilon guards the floor against binary fractions (0.29 · 100 = 28.999…)."""
    budget = torch.floor(n_visual.double() * ratio + 1e-9).long()
    return torch.where(n_visual > 0, budget.clamp(min=1), torch.zeros_like(budget))


def keep_top_visual(scores: torch.Tensor, visual: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep mask [B, T]: every non-visual token plus the `budget[b]` highest-scoring visual tokens of row b.

    Ties break towards the earlier position, so selection is deterministic."""
    masked = scores.float().masked_fill(~visual, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return ~visual | (rank < budget[:, None])


def split_budget(sizes: list[int], total: int) -> list[int]:
    """Split `total` kept tokens over groups of `sizes` in proportion (largest remainder, ties to the earlier
    group), never more than a group holds. Used to give each crop or frame its share of a sample's budget."""
    total = min(int(total), sum(sizes))
    whole = sum(sizes)
    if not sizes or whole == 0:
        return [0] * len(sizes)
    exact_shares = [total * size / whole for size in sizes]
    shares = [min(size, int(share)) for size, share in zip(sizes, exact_shares)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact_shares[i] - int(exact_shares[i])), i))
    missing = total - sum(shares)
    while missing > 0:  # one more for each group in that order that has room, until none is missing
        for i in order:
            if missing == 0:
                break
            if shares[i] < sizes[i]:
                shares[i] += 1
                missing -= 1
    return shares
