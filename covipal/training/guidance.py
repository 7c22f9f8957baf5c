"""Stage-1 labels (Eq. 3): the attention visual tokens receive at the guidance layer `l_g` of the frozen LLM.

`GuidanceProbe` runs the model only up to the input of decoder layer `l_g` (later layers never run), captures
that input, and recomputes the attention of the chosen query rows from the layer's own query and key
projections (`pruning.scoring.attention_received`), a chunk of rows at a time. No attention matrix is ever
taken from the kernel, so the same code serves sdpa and FlashAttention.

The sequences are prompts only (stage 1's batches are cut to the first question's prompt, as inference gives it:
`TrainingCollator(prompt_only=True)`), so every mode reads prompt rows and no label depends on an answer.
Query rows (DESIGN.md; `turn_ids` = the template's turn start and end tokens, e.g. `<|im_start|>`, `<|im_end|>`):
  literal            the last n_v rows, as Eq. 3 is written;
  text_after_visual  the text rows after the last visual token (question, end of turn, generation prompt);
  question           the user's text rows after the visual span, up to (not including) the end of its turn;
  last_prompt        the end-of-turn token that closes the user's prompt, just before the generation prompt;
  last               the final row (the end of the generation prompt: the row that predicts the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covipal.errors import CovipalError
from covipal.models.families import visual_mask
from covipal.pruning.scoring import attention_received
from covipal.training.layer_input import LayerInputCapture, ReachedLayer

QUERY_ROWS = ("literal", "text_after_visual", "question", "last_prompt", "last")
NEEDS_TURN_IDS = ("question", "last_prompt")
REDUCTIONS = ("sum", "max")  # over heads and query rows: Eq. 3's sum, or the most any head of any row pays
_MARK = "_covipal_guidance_probe"


@dataclass
class GuidanceBatch:
    embeds: torch.Tensor  # [B, T, D] the LLM's merged input embeddings: the PPM's input
    attention_mask: torch.Tensor  # [B, T] bool, False for padding
    visual: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T] float32 attention received (meaningful at visual positions)


def _last_index(where: torch.Tensor, default: torch.Tensor | int) -> torch.Tensor:
    """[B, 1]: the last position where `where` [B, T] holds, else `default`."""
    positions = torch.arange(where.shape[1], device=where.device).expand_as(where)
    found = torch.where(where, positions, torch.full_like(positions, -1)).amax(1, keepdim=True)
    return torch.where(found >= 0, found, torch.as_tensor(default, device=where.device).expand_as(found))


def check_query_rows(mode: str, turn_ids: tuple[int, int] | None) -> None:
    """Refuse, in one line, an unknown mode or a mode that needs the template's turn tokens without them."""
    if mode not in QUERY_ROWS:
        raise CovipalError(f"stage1.query_rows={mode!r} is not one of {', '.join(QUERY_ROWS)}")
    if mode in NEEDS_TURN_IDS and turn_ids is None:
        raise CovipalError(f"stage1.query_rows={mode} needs the chat template's turn tokens (turn_ids)")


def query_rows_mask(
    key_mask: torch.Tensor,
    visual: torch.Tensor,
    mode: str,
    input_ids: torch.Tensor | None = None,
    turn_ids: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[B, T] bool: the query rows whose attention is summed into the labels (modes in the module docstring)."""
    check_query_rows(mode, turn_ids)
    positions = torch.arange(key_mask.shape[1], device=key_mask.device).expand_as(key_mask)
    if mode == "literal":
        from_end = key_mask.flip(1).long().cumsum(1).flip(1)  # 1 for the last real token, 2 for the one before…
        n_visual = (visual & key_mask).sum(1, keepdim=True)
        return key_mask & (from_end <= n_visual)
    if mode == "last":
        return positions == _last_index(key_mask, -1)
    last_visual = _last_index(visual & key_mask, -1)
    if mode == "text_after_visual":
        return key_mask & ~visual & (positions > last_visual) & (last_visual >= 0)
    start_id, end_id = turn_ids
    generation = _last_index((input_ids == start_id) & key_mask, key_mask.shape[1])
    user_end = _last_index((input_ids == end_id) & key_mask & (positions < generation), generation)
    if mode == "question":
        return key_mask & ~visual & (positions > last_visual) & (positions < user_end) & (last_visual >= 0)
    return key_mask & (positions == user_end)  # last_prompt


class GuidanceProbe:
    """`with GuidanceProbe(model, layer) as probe: batch = probe(inputs)` — labels from the frozen model."""

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        query_rows: str = "literal",
        normalize: bool = False,
        chunk: int = 256,
        turn_ids: tuple[int, int] | None = None,
        reduce: str = "sum",
    ):
        self.model = model
        multimodal = model.model if hasattr(model, "lm_head") else model
        self.language_model = multimodal.language_model
        layers = self.language_model.layers
        if not 0 <= layer < len(layers):
            raise CovipalError(f"stage1.guidance_layer={layer} but the LLM has layers 0..{len(layers) - 1}")
        check_query_rows(query_rows, turn_ids)
        if reduce not in REDUCTIONS:
            raise CovipalError(f"stage1.reduce={reduce!r} is not one of {', '.join(REDUCTIONS)}")
        self.turn_ids = turn_ids
        self.reduce = reduce
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
        visual = visual_mask(self.config, ids) & key_mask
        rows = query_rows_mask(key_mask, visual, self.query_rows, ids, self.turn_ids)
        labels = attention_received(
            self.layer,
            self._layer_input.hidden,
            self._layer_input.position_embeddings,
            key_mask,
            rows,
            self.chunk,
            self.reduce,
        )
        if self.normalize:  # each sample's visual labels sum to 1
            labels = labels / (labels * visual).sum(1, keepdim=True).clamp(min=1e-12)
        self._captured.clear()
        self._layer_input.hidden = self._layer_input.position_embeddings = None  # hold no batch between calls
        return GuidanceBatch(embeds=embeds, attention_mask=key_mask, visual=visual, labels=labels)
