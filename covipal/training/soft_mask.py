"""Stage-2 soft pruning (Eqs. 5–7): P = σ(S) from the PPM, bias B = logsigmoid(S) added to the attention scores
of every visual key column for every query row strictly below the diagonal, in every LLM layer.

`SoftMaskSession` installs two forward pre-hooks on the model instance: the multimodal model's tells it which
positions are visual, the language model's scores the merged input embeddings with the PPM and replaces the 2D
padding mask by a 4D float mask = causal/padding mask + B. transformers passes a prepared 4D mask through to the
attention backend unchanged, so the same mask serves eager (added to the scores), SDPA (additive `attn_mask`)
and FlexAttention (added in its score_mod); gradients flow through the frozen LLM into the PPM. The diagonal
stays 0, so a pruned token still sees itself, exactly as in a hard-pruned forward's kept rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from covipal.errors import CovipalError
from covipal.models.families import visual_mask

_MARK = "_covipal_soft_mask_session"
BACKENDS = ("eager", "sdpa", "flex_attention")


def soft_mask(bias: torch.Tensor, key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: min where causality or padding forbids, else B_j below the diagonal, 0 on it.

    bias: [B, T] (0 on text); key_mask: [B, T] bool, False for padding."""
    length = key_mask.shape[1]
    positions = torch.arange(length, device=key_mask.device)
    below = positions[None, :] < positions[:, None]  # [T(query), T(key)]: key strictly before the query
    allowed = (below | torch.eye(length, dtype=torch.bool, device=key_mask.device))[None] & key_mask[:, None, :]
    minimum = torch.finfo(dtype).min
    mask = torch.where(below[None], bias.to(dtype)[:, None, :], torch.zeros((), dtype=dtype, device=bias.device))
    mask = mask.masked_fill(~allowed, minimum)
    return mask[:, None]


class SoftMaskSession:
    """`with SoftMaskSession(model, scorer) as session: out = model(**batch)`; then `session.scores` [B, T] (S,
    meaningful at `session.visual`) for the regulariser. `scorer(embeds, attention_mask) -> S` is the PPM."""

    def __init__(self, model: nn.Module, scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model = model
        self.scorer = scorer
        self.multimodal = model.model if hasattr(model, "lm_head") else model
        self.language_model = self.multimodal.language_model
        self.config = model.config
        backend = self.language_model.config._attn_implementation
        if backend not in BACKENDS:
            raise CovipalError(
                f"stage 2 needs a per-key attention bias, which {backend} cannot take; use "
                f"model.attn_implementation= one of {', '.join(BACKENDS)}"
            )
        self.backend = backend
        self._handles: list = []
        self._visual: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.visual: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def __enter__(self) -> SoftMaskSession:
        if getattr(self.model, _MARK, None) is not None:
            raise CovipalError("a soft-mask session is already installed on this model")
        setattr(self.model, _MARK, self)
        self._handles = [
            self.multimodal.register_forward_pre_hook(self._multimodal_hook, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._language_model_hook, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)

    def _multimodal_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise CovipalError("stage 2 needs input_ids to know which positions are visual")
        self._visual = visual_mask(self.config, input_ids)

    def _language_model_hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise CovipalError("the stage-2 soft mask is for training forwards, not for decoding with a cache")
        embeds = kwargs["inputs_embeds"]
        if self.backend == "flex_attention" and embeds.device.type == "cpu" and torch.is_grad_enabled():
            raise CovipalError(
                "FlexAttention has no backward pass on CPU in this torch build; train stage 2 with "
                "model.attn_implementation=sdpa (or eager) here, flex_attention on a GPU"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise CovipalError("stage 2 needs a 2D attention_mask (padding mask)")
        key_mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        visual = self._visual & key_mask
        scores = self.scorer(embeds, key_mask)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        bias = torch.where(visual, F.logsigmoid(scores), torch.zeros_like(scores))
        self.scores, self.visual, self.attention_mask = scores, visual, key_mask
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = soft_mask(bias, key_mask, embeds.dtype)
        return args, kwargs
