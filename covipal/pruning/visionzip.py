"""VisionZip at the vision side: per crop or frame, dominant tokens (the most attended in the tower) stay, and the
rest is folded into a few contextual tokens.

Per view (an image's base crop, its high-resolution grid, a video frame) with its share s of the budget:
- d = round(s · 5.4 / 6.4) dominant tokens: top by the attention they received in the tower layer that made the
  features, averaged over heads and query rows (SigLIP has no CLS token);
- c = s − d contextual tokens: of the remaining tokens, every ⌊n/c⌋-th is a target; every other joins the target
  its key (L2-normalised, averaged over heads) is most similar to; a target becomes target + mean of its joiners.
Kept tokens stay in raster order (their own slots and position ids).

Difference from the released code, which merges the tower's hidden states before the projector: we merge the
projected embeddings the LLM reads, after anyres packing and video pooling, so budgets count LLM tokens exactly
(unpadding removes tower tokens, pooling mixes them). The mapping from tower to LLM tokens is the model's own
(vision_tokens.py)."""

from __future__ import annotations

import torch

from covipal.errors import CovipalError
from covipal.pruning.budget import check_ratio
from covipal.pruning.context import LayerContext, Merge
from covipal.pruning.vision_tokens import VisionTokens, merge_per_view


def contextual_merge(hidden: torch.Tensor, keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold n tokens (hidden [n, D], keys [n, d]) into `count` targets: (target indices [count], merged [count, D])."""
    n = hidden.shape[0]
    step = max(1, n // count)
    targets = torch.arange(0, step * count, step, device=hidden.device)[:count]
    others = torch.ones(n, dtype=torch.bool, device=hidden.device)
    others[targets] = False
    normed = torch.nn.functional.normalize(keys.float(), dim=-1)
    merged = hidden[targets].clone()
    if bool(others.any()):
        similarity = normed[others] @ normed[targets].T  # [n - count, count]
        choice = similarity.argmax(1)
        sums = torch.zeros_like(merged).index_add_(0, choice, hidden[others])
        counts = torch.bincount(choice, minlength=count).clamp(min=1).to(merged.dtype)
        merged = merged + sums / counts[:, None]
    return targets, merged


class VisionZipPruner:
    drop_layers = (0,)

    def __init__(self, reserve_ratio: float = 0.5, dominant_share: float = 5.4 / 6.4):
        """dominant_share: fraction of each view's budget given to dominant tokens (VisionZip's 54:10)."""
        self.reserve_ratio = check_ratio(reserve_ratio)
        if not 0.0 < dominant_share <= 1.0:
            raise CovipalError(f"pruner.dominant_share={dominant_share!r} must lie in (0, 1], e.g. 0.84375 (54:10)")
        self.dominant_share = float(dominant_share)
        self.tokens = VisionTokens(with_attention=True, with_keys=True)

    def setup(self, model) -> None:
        return None

    def attach(self, model) -> list:
        return self.tokens.attach(model)

    def select(self, context: LayerContext) -> Merge:
        return merge_per_view(context, self.tokens.facts(), self.reserve_ratio, self._fold)

    def _fold(self, context: LayerContext, facts, b: int, positions, share: int, keep, hidden) -> None:
        dominant = min(share, round(share * self.dominant_share))
        order = torch.argsort(facts.score[b, positions], descending=True, stable=True)
        keep[b, positions[order[:dominant]]] = True
        contextual = share - dominant
        if contextual == 0:
            return
        rest = positions[torch.sort(order[dominant:]).values]
        targets, merged = contextual_merge(context.hidden_states[b, rest], facts.keys[b, rest], contextual)
        keep[b, rest[targets]] = True
        hidden[b, rest[targets]] = merged
