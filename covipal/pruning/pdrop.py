"""PyramidDrop: the LLM is cut into stages at `layers`; entering stage i, the visual tokens are ranked by the
attention the last instruction token pays them in the layer they are about to enter (its input norm, q/k
projections and RoPE, recomputed for that one row, so any attention kernel works; mean over heads) and the top
λ^i · n_v stay. λ is solved from the average reserve ratio (schedules.pdrop_lambda) unless given.

Kept tokens keep their original position ids (the released code renumbers them contiguously after each drop);
every method here keeps original positions, so their comparison differs only in which tokens they keep."""

from __future__ import annotations

import torch

from covipal.errors import CovipalError
from covipal.pruning.budget import check_ratio, keep_top_visual, visual_budget
from covipal.pruning.context import LayerContext
from covipal.pruning.schedules import check_layers, pdrop_lambda
from covipal.pruning.scoring import attention_received, attention_rows, last_real_index


class PyramidDropPruner:
    def __init__(self, reserve_ratio: float = 0.5, layers: list[int] | None = None, lambda_: float | None = None):
        """layers: where the stages start (0 = before the LLM); default: the model's layer plan.
        lambda_: the per-stage keep ratio; when None it is solved from `reserve_ratio`."""
        self.reserve_ratio = check_ratio(reserve_ratio)
        if lambda_ is not None and not 0.0 < lambda_ <= 1.0:
            raise CovipalError(f"pruner.lambda_={lambda_!r} must lie in (0, 1]; or leave it null to solve it from r")
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.lambda_ = lambda_
        self.solved_lambda: float | None = None

    @property
    def drop_layers(self) -> tuple[int, ...]:
        if self.layers is None:
            raise CovipalError("pruner=pdrop needs pruner.layers (the model config's layer_plan.pdrop sets it)")
        return tuple(self.layers)

    def setup(self, model) -> None:
        num_layers = model.config.text_config.num_hidden_layers
        self.layers = check_layers(self.drop_layers, num_layers)
        self.solved_lambda = self.lambda_ or pdrop_lambda(self.reserve_ratio, self.layers, num_layers)

    def keep_fraction(self, layer: int) -> float:
        return self.solved_lambda ** (self.layers.index(layer) + 1)

    def scores(self, context: LayerContext) -> torch.Tensor:
        """Mean over heads of the attention from the last real token in layer `context.layer`, [B, T]. In training
        (`extras["query_positions"]`, the tokens just before each answer span) the attention of those rows, summed."""
        layer = context.language_model.layers[context.layer]
        embeddings = context.position_embeddings
        if embeddings is None:  # before the LLM: the rotary embeddings of the original positions
            embeddings = context.language_model.rotary_emb(context.hidden_states, context.position_ids)
        queries = context.extras.get("query_positions")
        if queries is not None:
            queries = queries.gather(1, context.source_index) & context.attention_mask
            last = torch.zeros_like(queries).scatter_(1, last_real_index(context.attention_mask), True)
            queries = torch.where(queries.any(1, keepdim=True), queries, last)  # a row without answers: its end
            return attention_received(layer, context.hidden_states, embeddings, context.attention_mask, queries)
        rows = attention_rows(
            layer, context.hidden_states, embeddings, context.attention_mask, last_real_index(context.attention_mask)
        )
        return rows.mean(1)[:, 0]

    def select(self, context: LayerContext) -> torch.Tensor:
        budget = visual_budget(context.n_visual, self.keep_fraction(context.layer))
        with torch.no_grad():  # ranking only: no graph through the scores when the LLM is being trained
            scores = self.scores(context)
        return keep_top_visual(scores, context.visual, budget)
