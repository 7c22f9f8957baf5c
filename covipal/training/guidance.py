"""Stage-1 labels (Eq. 3): the attention visual tokens receive at the guidance layer `l_g` of the frozen LLM.

`GuidanceProbe` runs the model only up to the input of decoder layer `l_g` (later layers never run), captures
that input, and recomputes the attention of the chosen query rows from the layer's own query and key
projections (`pruning.scoring.attention_received`), a chunk of rows at a time. No attention matrix is ever
taken from the kernel, so the same code serves sdpa and FlashAttention.

Query rows (DESIGN.md): "literal" = the last n_v rows of each sample, as Eq. 3 is written (default);
"text_after_visual" = the text rows after the last visual token; "last" = the final token only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covipal.errors import CovipalError
from covipal.pruning.scoring import attention_received
from covipal.training.layer_input import LayerInputCapture, ReachedLayer

QUERY_ROWS = ("literal", "text_after_visual", "last")
_MARK = "_covipal_guidance_probe"


@dataclass
class GuidanceBatch:
    embeds: torch.Tensor  # [B, T, D] the LLM's merged input embeddings: the PPM's input
    attention_mask: torch.Tensor  # [B, T] bool, False for padding
    visual: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T] float32 attention received (meaningful at visual positions)


def query_rows_mask(key_mask: torch.Tensor, visual: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T] bool: the query rows whose attention is summed into the labels."""
    if mode == "literal":
        from_end = key_mask.flip(1).long().cumsum(1).flip(1)  # 1 for the last real token, 2 for the one before…
        n_visual = (visual & key_mask).sum(1, keepdim=True)
        return key_mask & (from_end <= n_visual)
    positions = torch.arange(key_mask.shape[1], device=key_mask.device).expand_as(key_mask)
    if mode == "text_after_visual":
        last_visual = torch.where(visual & key_mask, positions, torch.full_like(positions, -1)).amax(1, keepdim=True)
        return key_mask & ~visual & (positions > last_visual) & (last_visual >= 0)
    if mode == "last":
        last = torch.where(key_mask, positions, torch.full_like(positions, -1)).amax(1, keepdim=True)
        return positions == last
    raise CovipalError(f"stage1.query_rows={mode!r} is not one of {', '.join(QUERY_ROWS)}")


class GuidanceProbe:
    """`with GuidanceProbe(model, layer) as probe: batch = probe(inputs)` — labels from the frozen model."""

    def __init__(
        self, model: nn.Module, layer: int, query_rows: str = "literal", normalize: bool = False, chunk: int = 256
    ):
        self.model = model
        multimodal = model.model if hasattr(model, "lm_head") else model
        self.language_model = multimodal.language_model
        layers = self.language_model.layers
        if not 0 <= layer < len(layers):
            raise CovipalError(f"stage1.guidance_layer={layer} but the LLM has layers 0..{len(layers) - 1}")
        query_rows_mask(torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), query_rows)
        self.layer_index = layer
        self.layer = layers[layer]
        self._layer_input = LayerInputCapture(model, layer, stop=True)
        self.query_rows = query_rows
        self.normalize = normalize
        self.chunk = chunk
        self.config = model.config
        self._handles: list = []
        self._captured: dict = {}

    def __enter__(self) -> GuidanceProbe:
        if getattr(self.model, _MARK, None) is not None:
            raise CovipalError("a guidance probe is already installed on this model")
        setattr(self.model, _MARK, self)
        self._layer_input.__enter__()
        self._handles = [self.language_model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()
        self._layer_input.__exit__(*exc)
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)

    def _capture_inputs(self, module, args, kwargs):
        self._captured["embeds"] = kwargs["inputs_embeds"]
        self._captured["mask"] = kwargs.get("attention_mask")

    @torch.no_grad()
    def __call__(self, inputs: dict) -> GuidanceBatch:
        self._captured.clear()
        try:
            self.model(**inputs, use_cache=False)
        except ReachedLayer:
            pass
        else:
            raise RuntimeError("the forward finished without reaching the guidance layer")
        embeds = self._captured["embeds"]
        mask = self._captured["mask"]
        key_mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        ids = inputs["input_ids"]
        visual = ((ids == self.config.image_token_id) | (ids == self.config.video_token_id)) & key_mask
        rows = query_rows_mask(key_mask, visual, self.query_rows)
        labels = attention_received(
            self.layer, self._layer_input.hidden, self._layer_input.position_embeddings, key_mask, rows, self.chunk
        )
        if self.normalize:  # each sample's visual labels sum to 1
            labels = labels / (labels * visual).sum(1, keepdim=True).clamp(min=1e-12)
        self._captured.clear()
        self._layer_input.hidden = self._layer_input.position_embeddings = None  # hold no batch between calls
        return GuidanceBatch(embeds=embeds, attention_mask=key_mask, visual=visual, labels=labels)
