"""SparseVLM (v1.5 behaviour, with recycling): text raters pick the visual tokens to keep inside the LLM.

- Raters, once per prefill, from the LLM input embeddings: M = softmax over the question's text tokens of
  H_v·H_tᵀ, averaged over visual tokens; the raters are the text tokens after the last visual token with M above
  its mean.
- At each pruning layer l the layer runs on every token; the score of a visual token is the raters' attention to
  it in layer l (recomputed for the rater rows only, so any attention kernel works), summed over heads and raters;
  from layer l+1 on only the top tokens of the schedule stay.
- Recycling: of the tokens deleted at a stage, the top ⌊0.3·n⌋+1 by score are clustered (DPC-kNN on their
  hidden states) into ⌊m/10⌋+1 groups; each group's mean takes the slot of its best-scored member. Recycled
  tokens count as kept, so pure keeps + groups = the schedule's count exactly.
- Schedule: the v1.5 shape [0.52, 0.35, 0.19]·n_v, scaled (schedules.sparsevlm_scale) to the average r.
The released code appends recycled tokens after the kept ones and renumbers positions; here they keep a member's
slot and position id, like every method in this framework."""

from __future__ import annotations

import torch

from covipal.errors import CovipalError
from covipal.models.families import visual_mask
from covipal.pruning.budget import check_ratio, keep_top_visual, visual_budget
from covipal.pruning.clustering import knn_density_peaks
from covipal.pruning.context import LayerContext, Merge
from covipal.pruning.schedules import bisect, check_layers, staged_average
from covipal.pruning.scoring import attention_received

V15_SHAPE = (0.52, 0.35, 0.19)


def sparsevlm_scale(reserve_ratio: float, drops: list[int], shape, num_layers: int) -> float:
    """s such that keeping min(1, s·shape[i]) of n_v from drops[i] on averages `reserve_ratio` over the layers."""

    def average(scale: float) -> float:
        return staged_average(drops, [min(1.0, scale * a) for a in shape], num_layers)

    if reserve_ratio >= 1.0:
        return 1.0 / min(shape)
    if reserve_ratio <= average(0.0) + 1e-9:
        raise CovipalError(
            f"sparsevlm pruning at layers {[d - 1 for d in drops]} on {num_layers} layers cannot average "
            f"pruner.reserve_ratio={reserve_ratio}: layers 0..{drops[0] - 1} see every token; use "
            f"pruner.reserve_ratio>={(drops[0] + 0.5) / num_layers:.2f} or an earlier first pruning layer"
        )
    return bisect(average, reserve_ratio, 0.0, 1.0 / min(shape))


def recycle_split(current: int, target: int) -> tuple[int, int, int]:
    """(pure keeps, recycled candidates m, groups g) with keeps + g = target, m = ⌊0.3·deleted⌋+1, g = ⌊m/10⌋+1."""
    if target >= current:
        return current, 0, 0
    keeps = target
    while keeps > 0:
        deleted = current - keeps
        candidates = min(deleted, int(0.3 * deleted) + 1)
        groups = min(candidates, candidates // 10 + 1)
        if keeps + groups <= target:
            return keeps, candidates, target - keeps
        keeps -= 1
    return 0, min(current, int(0.3 * current) + 1), target


def text_raters(embeds: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the raters among the text tokens after each row's last visual token."""
    positions = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, positions, torch.full_like(positions, -1)).amax(1, keepdim=True)
    text = mask & ~visual & (positions > last_visual)
    raters = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        if not bool(visual[b].any()) or not bool(text[b].any()):
            continue
        logits = embeds[b, visual[b]].float() @ embeds[b, text[b]].float().T  # [n_v, n_t]
        relevance = torch.softmax(logits, dim=1).mean(0)
        chosen = relevance > relevance.mean()
        if not bool(chosen.any()):
            chosen = relevance >= relevance.max()
        raters[b, text[b].nonzero().squeeze(1)[chosen]] = True
    return raters


class SparseVLMPruner:
    def __init__(
        self,
        reserve_ratio: float = 0.5,
        layers: list[int] | None = None,
        shape: list[float] = V15_SHAPE,
        recycle: bool = True,
    ):
        """layers: the pruning layers (each runs on all tokens; the drop is before the next). shape: the schedule's
        relative keep fractions per stage, scaled to `reserve_ratio`."""
        self.reserve_ratio = check_ratio(reserve_ratio)
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.shape = [float(a) for a in shape]
        self.recycle = recycle
        self.fractions: list[float] | None = None
        self._raters: torch.Tensor | None = None

    @property
    def drop_layers(self) -> tuple[int, ...]:
        if self.layers is None:
            raise CovipalError("pruner=sparsevlm needs pruner.layers (the model config's layer_plan sets it)")
        return tuple(layer + 1 for layer in self.layers)

    def setup(self, model) -> None:
        num_layers = model.config.text_config.num_hidden_layers
        check_layers(self.layers or [], num_layers - 1, "pruner.layers")
        if len(self.shape) != len(self.layers):
            raise CovipalError(
                f"pruner.shape has {len(self.shape)} fractions for {len(self.layers)} pruning layers; give one each"
            )
        drops = list(self.drop_layers)
        scale = sparsevlm_scale(self.reserve_ratio, drops, self.shape, num_layers)
        self.fractions = [min(1.0, scale * a) for a in self.shape]

    def attach(self, model) -> list:
        config = model.config

        def capture(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            cache = kwargs.get("past_key_values")
            if embeds is None or (cache is not None and cache.get_seq_length() > 0):
                return None
            ids = self._input_ids
            mask = kwargs.get("attention_mask")
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
            visual = visual_mask(config, ids) if ids is not None else None
            if visual is None or visual.shape != mask.shape:
                visual = torch.zeros_like(mask)
            self._raters = text_raters(embeds, visual & mask, mask)
            return None

        def remember_ids(module, args, kwargs):
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
            return None

        self._input_ids = None
        return [
            model.model.register_forward_pre_hook(remember_ids, with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True),
        ]

    def scores(self, context: LayerContext) -> torch.Tensor:
        """The raters' attention to every token in the pruning layer (the one before `context.layer`), [B, T]."""
        raters = self._raters.gather(1, context.source_index) & context.attention_mask
        layer = context.language_model.layers[context.layer - 1]
        return attention_received(
            layer, context.previous_hidden_states, context.position_embeddings, context.attention_mask, raters
        )

    def select(self, context: LayerContext) -> torch.Tensor | Merge:
        stage = self.drop_layers.index(context.layer)
        scores = self.scores(context)
        targets = visual_budget(context.n_visual, self.fractions[stage])
        current = context.visual.sum(1)
        if not self.recycle:
            return keep_top_visual(scores, context.visual, targets)
        keep = ~context.visual
        hidden = context.hidden_states.clone()
        for b in range(keep.shape[0]):
            visual = context.visual[b].nonzero().squeeze(1)
            keeps, candidates, groups = recycle_split(int(current[b]), int(targets[b]))
            order = visual[torch.argsort(scores[b, visual], descending=True, stable=True)]
            keep[b, order[:keeps]] = True
            if groups == 0:
                continue
            recycled = order[keeps : keeps + candidates]  # best-scored first
            labels = knn_density_peaks(context.hidden_states[b, recycled], groups)
            for group in range(groups):
                members = recycled[labels == group]
                if members.numel() == 0:
                    continue
                keep[b, members[0]] = True
                hidden[b, members[0]] = context.hidden_states[b, members].mean(0)
        return Merge(keep, hidden)
