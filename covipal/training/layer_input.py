"""Capturing a decoder layer's input (hidden states and rotary embeddings) with a pre-hook on the instance, so
attention rows can be recomputed from the layer's own projections on any kernel (stage-1 labels, the grounding
terms of pretraining)."""

from __future__ import annotations

import torch
from torch import nn

_MARK = "_covipal_layer_input_capture"


class ReachedLayer(Exception):
    """Raised by a stopping capture once it holds its layer's input: the rest of the forward never runs."""


class LayerInputCapture:
    """`with LayerInputCapture(model, layer) as capture: model(...)` keeps decoder `layer`'s input of the last
    forward in `capture.hidden` / `capture.position_embeddings`. With `stop=True` the forward ends there by
    raising `ReachedLayer` (the caller catches it), so later layers never run."""

    def __init__(self, model: nn.Module, layer: int, stop: bool = False):
        multimodal = model.model if hasattr(model, "lm_head") else model
        self.layer = multimodal.language_model.layers[layer]
        self.stop = stop
        self.hidden: torch.Tensor | None = None
        self.position_embeddings = None
        self._handle = None

    def __enter__(self) -> LayerInputCapture:
        if getattr(self.layer, _MARK, None) is not None:
            raise RuntimeError("a layer-input capture is already installed on this layer")
        setattr(self.layer, _MARK, self)
        self._handle = self.layer.register_forward_pre_hook(self._capture, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()  # what was captured stays readable after the block
        delattr(self.layer, _MARK)

    def _capture(self, module, args, kwargs):
        self.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.position_embeddings = kwargs["position_embeddings"]
        if self.stop:
            raise ReachedLayer
