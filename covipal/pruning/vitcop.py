"""ViTCoP: vision-side filtering, then collaborative pruning in a shallow LLM layer and key-norm pruning in a deep
one (papers/vitcop.md; BASELINES.md for the released code's choices).

- Stage I (before the LLM, with the vision tower's facts): keep floor(V · n_v) visual tokens by the attention they
  received in the tower (mean over heads and query rows; SigLIP has no CLS token). Then cluster them with VIC on
  their tower keys: density with cutoff d_c, nearest denser token within spatial distance τ on the normalised grid
  of the same crop or frame, the ⌈p·n⌉ largest ρ·δ as centres.
- Stage II (input of LLM layer S): key norm = mean over heads of ‖k_h‖ in that layer (RoPE rotates pairs, so it
  does not change norms; smaller = more important). Budget k2: each cluster keeps its lowest-norm elites, by a
  quota proportional to its size out of k2 − (#clusters), and the rest of the cluster becomes one token, the mean,
  in the slot of the rest's median position. Quotas are floored as in the paper, and the leftover elites go to
  the largest remainders, so the stage keeps exactly k2.
- Stage III (input of layer D): the lowest-norm floor(k2 / 5) stay.
k2 is solved from the average r: [S·k1 + (D − S)·k2 + (L − D)·k2/5] / L = r·n_v, feasible when k2 ≤ k1, i.e.
r ≤ V·(D + (L − D)/5)/L. V defaults to 0.3 + 0.8·r (0.7 at r = 0.5, 0.5 at r = 0.25), raised to what r needs.
d_c: the paper's 8 is for CLIP keys; by default it is the 2% quantile of the sample's key distances, so it
adapts to SigLIP's (and the tiny model's) key scale. p follows the paper's 0.18 / 0.15 / 0.12 at r = 1/3, 2/9,
1/9, interpolated in r."""

from __future__ import annotations

import math

import numpy as np
import torch

from covipal.errors import CovipalError
from covipal.pruning.budget import check_ratio, keep_top_visual, split_budget
from covipal.pruning.clustering import visual_information_clusters
from covipal.pruning.context import LayerContext, Merge
from covipal.pruning.schedules import check_layers
from covipal.pruning.scoring import heads
from covipal.pruning.vision_tokens import VisionTokens

CENTRE_RATIOS = ((1 / 9, 0.12), (2 / 9, 0.15), (1 / 3, 0.18))
STAGE3_SHARE = 0.2


def centre_ratio(reserve_ratio: float) -> float:
    xs, ys = zip(*CENTRE_RATIOS)
    return float(np.interp(reserve_ratio, xs, ys))


def key_norms(layer, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T]: mean over key heads of the L2 norm of each token's key in `layer` (from its input `hidden`; after
    the layer's per-head key norm where it has one)."""
    keys = heads(layer.self_attn, "k", layer.input_layernorm(hidden)).transpose(1, 2).float()
    return keys.norm(dim=-1).mean(-1)


def vitcop_counts(reserve_ratio: float, vision_keep: float, n_visual: int, S: int, D: int, L: int):
    """(k1, k2, k3) visual tokens kept by stages I, II, III for one sample (see the module docstring)."""
    k1 = max(1, int(np.floor(vision_keep * n_visual + 1e-9)))
    k2 = (reserve_ratio * n_visual * L - S * k1) / ((D - S) + (L - D) * STAGE3_SHARE)
    k2 = int(min(k1, max(1, round(k2))))
    return k1, k2, max(1, int(k2 * STAGE3_SHARE))


def cluster_selection(labels: torch.Tensor, norms: torch.Tensor, budget: int):
    """Stage II for one sample's visual tokens (in sequence order): keep `budget` of them, one merged token per
    cluster plus its lowest-norm elites by quota. Clusters beyond the budget (more clusters than `budget`) are
    dropped, smallest first (ties: the larger label); the quotas split the rest of the budget over the clusters, in
    the order of their first token, in proportion to their size − 1 (`split_budget`). Returns, as indices into the
    tokens: the elites, each cluster's slot (the median position of its non-elite rest), the rests, and each rest
    token's cluster (0.. in slot order)."""
    ids, cluster_of, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    groups = min(len(ids), budget)
    position = torch.arange(len(labels), device=labels.device)
    chosen = torch.sort(-sizes, stable=True).indices[:groups]  # the largest; ties to the smaller label
    first = torch.full_like(sizes, len(labels)).scatter_reduce_(0, cluster_of, position, "amin")
    chosen = chosen[torch.argsort(first[chosen])]  # in the order of their first token
    group_of = torch.full_like(sizes, -1)
    group_of[chosen] = torch.arange(groups, device=labels.device)
    group = group_of[cluster_of]  # each token's chosen cluster, −1 where its cluster is dropped
    counts = sizes[chosen]
    quotas = torch.tensor(split_budget((counts - 1).tolist(), budget - groups), device=labels.device)
    members = position[group >= 0]
    order = members[torch.argsort(norms[members], stable=True)]  # by key norm, ties by position
    order = order[torch.sort(group[order], stable=True).indices]  # ... within each cluster, clusters in order
    starts = torch.cumsum(counts, 0) - counts
    is_elite = torch.arange(len(order), device=labels.device) - starts[group[order]] < quotas[group[order]]
    rest = torch.sort(order[~is_elite]).values  # by position ...
    rest = rest[torch.sort(group[rest], stable=True).indices]  # ... within each cluster
    rest_counts = counts - quotas  # at least 1: a quota never takes a whole cluster
    slots = rest[torch.cumsum(rest_counts, 0) - rest_counts + (rest_counts - 1) // 2]
    return order[is_elite], slots, rest, group[rest]


def group_means(hidden: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, d]: the mean of the rows of `hidden` in each group, accumulated in at least float32."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    sums = torch.zeros(groups, hidden.shape[-1], dtype=dtype, device=hidden.device).index_add_(
        0, group, hidden.to(dtype)
    )
    counts = torch.bincount(group, minlength=groups).to(dtype)
    return (sums / counts[:, None]).to(hidden.dtype)


class ViTCoPPruner:
    def __init__(
        self,
        reserve_ratio: float = 0.5,
        layers: list[int] | None = None,
        vision_keep: float | None = None,
        cutoff: float | None = None,
        spatial: float = 0.6,
        centres: float | None = None,
    ):
        """layers: [S, D], the LLM layers of stages II and III (default: the model's layer plan).
        vision_keep: V, stage I's keep fraction (None: 0.3 + 0.8·r, raised if r needs more).
        cutoff: VIC's d_c (None: 2% quantile of key distances). spatial: τ. centres: p (None: from r)."""
        self.reserve_ratio = check_ratio(reserve_ratio)
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.vision_keep = vision_keep
        self.cutoff = cutoff
        self.spatial = float(spatial)
        self.centres = centres
        self.tokens = VisionTokens(with_attention=True, with_keys=True)
        self._labels: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def drop_layers(self) -> tuple[int, ...]:
        if self.layers is None or len(self.layers) != 2:
            raise CovipalError(
                f"pruner.layers={self.layers} must be [S, D], the LLM layers of ViTCoP's stages II and III"
            )
        return (0, *self.layers)

    def setup(self, model) -> None:
        self.num_layers = model.config.text_config.num_hidden_layers
        S, D = check_layers(self.layers, self.num_layers)
        if S < 1:
            raise CovipalError(f"pruner.layers={self.layers}: stage II needs S >= 1 (stage I is before the LLM)")
        reach = (D + (self.num_layers - D) * STAGE3_SHARE) / self.num_layers
        needed = self.reserve_ratio / reach
        keep = (
            self.vision_keep if self.vision_keep is not None else min(1.0, max(0.3 + 0.8 * self.reserve_ratio, needed))
        )
        if keep < needed - 1e-9 or needed > 1.0:
            feasible = min(math.ceil(needed * 1000) / 1000, 1.0)
            raise CovipalError(
                f"vitcop with V={keep} and layers [{S}, {D}] on {self.num_layers} layers cannot average "
                f"pruner.reserve_ratio={self.reserve_ratio}; use pruner.vision_keep>={feasible}"
                + ("" if needed <= 1.0 else " and a later stage III layer (pruner.layers)")
            )
        self.solved_vision_keep = keep
        self.solved_centres = self.centres if self.centres is not None else centre_ratio(self.reserve_ratio)

    def attach(self, model) -> list:
        return self.tokens.attach(model)

    def select(self, context: LayerContext) -> torch.Tensor | Merge:
        if context.layer == 0:
            return self._stage1(context)
        if context.layer == self.layers[0]:
            return self._stage2(context)
        return self._stage3(context)

    def _stage1(self, context: LayerContext) -> torch.Tensor:
        facts = self.tokens.facts()
        S, D = self.layers
        counts = [
            vitcop_counts(self.reserve_ratio, self.solved_vision_keep, int(n), S, D, self.num_layers)
            if n > 0
            else (0, 0, 0)
            for n in context.n_visual.tolist()
        ]
        self._counts = torch.tensor(counts, device=context.visual.device)
        scores = torch.where(facts.view >= 0, facts.score, facts.score - 1.0)  # newline tokens rank last
        keep = keep_top_visual(scores, context.visual, self._counts[:, 0])
        self._labels = torch.full_like(facts.view, -1)
        for b in range(keep.shape[0]):
            kept = torch.nonzero(keep[b] & context.visual[b]).squeeze(1)
            if kept.numel() == 0:
                continue
            views = facts.view[b, kept]
            labels = visual_information_clusters(
                facts.keys[b, kept],
                torch.stack([facts.row[b, kept], facts.col[b, kept]], dim=1),
                self.solved_centres,
                cutoff=self.cutoff,
                spatial=self.spatial,
                views=views,
            )
            self._labels[b, kept] = labels
        return keep

    def _stage2(self, context: LayerContext) -> Merge:
        norms = key_norms(context.language_model.layers[context.layer], context.hidden_states)
        labels = self._labels.gather(1, context.source_index)
        keep = ~context.visual
        hidden = context.hidden_states.clone()
        for b in range(keep.shape[0]):
            visual = torch.nonzero(context.visual[b]).squeeze(1)
            if visual.numel() == 0:
                continue
            elites, slots, rest, rest_group = cluster_selection(
                labels[b, visual], norms[b, visual], int(self._counts[b, 1])
            )
            keep[b, visual[elites]] = True
            keep[b, visual[slots]] = True
            hidden[b, visual[slots]] = group_means(context.hidden_states[b, visual[rest]], rest_group, len(slots))
        return Merge(keep, hidden)

    def _stage3(self, context: LayerContext) -> torch.Tensor:
        norms = key_norms(context.language_model.layers[context.layer], context.hidden_states)
        return keep_top_visual(-norms, context.visual, self._counts[:, 2])
