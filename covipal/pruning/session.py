"""Install a pruner on one model instance through forward pre-hooks, and take them off again.

How a pruned forward works (prefill):
  1. a pre-hook on the multimodal model reads `input_ids` to know which positions are visual;
  2. a pre-hook on the language model asks the pruner for a keep mask if it prunes before layer 0, and passes
     the LLM only the kept embeddings, with the kept tokens' original position ids and an explicit 2D mask;
  3. pre-hooks on decoder layers do the same at the layers where the pruner drops tokens inside the LLM
     (gathering hidden states and rotary embeddings, and rebuilding that layer's attention mask with the model's
     own mask function, so every attention backend gets the mask form it expects).
Rows that keep different numbers of tokens are left-padded. Visual inputs a family adds after the first LLM layers
(Qwen3-VL's DeepStack) are taken out of the LLM's call and added by post-hooks to the tokens still there, each its
own. During decoding the cache holds only kept tokens:
the hooks splice the kept prefix into `attention_mask` and give new tokens the positions that follow the
*original* sequence length. Nothing is assigned to any class; `__exit__` restores the instance bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from covipal.errors import CovipalError
from covipal.models.families import family_of, visual_mask
from covipal.pruning.context import LayerContext, Merge, Pruner
from covipal.pruning.sequence import Compaction

_MARK = "_covipal_pruning_session"


@dataclass
class Stage:
    """The token set in force from decoder layer `layer` on."""

    layer: int
    compaction: Compaction | None  # from the original sequence; None = nothing dropped yet
    mask2d: torch.Tensor  # [B, L] bool, valid non-padding tokens
    visual: torch.Tensor  # [B, L] bool
    position_ids: torch.Tensor  # [B, L], or [3, B, L] for M-RoPE families
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    layer_mask: object = None  # attention mask for layers of this stage, in the backend's form
    local: Compaction | None = None  # from the previous stage


@dataclass
class PrefillRecord:
    """What the last prefill did: per-sample visual counts of the input and of every LLM layer."""

    n_visual: torch.Tensor  # [B]
    stages: list[Stage] = field(default_factory=list)
    num_layers: int = 0
    length: int = 0
    select_seconds: float = 0.0  # time spent in the pruner's `select` (for CoViPAL: the PPM and its top-k)
    prefill_seconds: float = 0.0  # the whole prefill forward: vision tower, projector, pruner and LLM

    def stage_at(self, layer: int) -> Stage:
        """The stage in force at the input of decoder `layer`."""
        return [stage for stage in self.stages if stage.layer <= layer][-1]

    @property
    def layer_visual_tokens(self) -> torch.Tensor:
        """[num_layers, B]: visual tokens each decoder layer took in, per sample."""
        return torch.stack([self.stage_at(layer).visual.sum(1) for layer in range(self.num_layers)])

    @property
    def reserve_ratio(self) -> torch.Tensor:
        """[B]: average over layers of kept / n_v (1 for samples without visual tokens)."""
        n = self.n_visual.clamp(min=1).double()
        ratio = self.layer_visual_tokens.double().mean(0) / n
        return torch.where(self.n_visual > 0, ratio, torch.ones_like(ratio))

    @property
    def kept(self) -> Compaction | None:
        """Compaction from the original sequence to the LLM's output rows (None if nothing was dropped)."""
        return self.stages[-1].compaction

    def visual_kept(self, row: int, layer: int | None = None) -> torch.Tensor:
        """Bool over sample `row`'s visual tokens (in input order): those decoder `layer` (None: the last stage,
        what the last layer sees) takes in. A merged token counts as the member whose slot it takes."""
        positions = self.stages[0].visual[row].nonzero().squeeze(1)
        compaction = (self.stages[-1] if layer is None else self.stage_at(layer)).compaction
        if compaction is None:
            return torch.ones(len(positions), dtype=torch.bool, device=positions.device)
        kept = torch.zeros(self.length, dtype=torch.bool, device=positions.device)
        kept[compaction.index[row][compaction.valid[row]]] = True
        return kept[positions]

    def relevant_kept(self, row: int, relevance) -> list[float] | None:
        """Per decoder layer, the share of sample `row`'s relevant visual tokens (`relevance`: bool over its visual
        tokens in order) that the layer takes in; None without relevant tokens."""
        if relevance is None:
            return None
        relevant = torch.as_tensor(relevance, dtype=torch.bool).to(self.n_visual.device)
        if len(relevant) != int(self.n_visual[row]):
            raise CovipalError(
                f"relevance has {len(relevant)} entries but sample {row} has {int(self.n_visual[row])} visual tokens: "
                "the ground truth is laid out for another model's visual tokens (the tiny world's is for tiny LLaVA)"
            )
        if not bool(relevant.any()):
            return None
        return [
            float((self.visual_kept(row, layer) & relevant).sum() / relevant.sum()) for layer in range(self.num_layers)
        ]


def _now(model: nn.Module) -> float:
    """perf_counter after the device's queued work (CUDA runs asynchronously), so intervals time the work."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


class PruningSession:
    """Context manager: `with PruningSession(model, pruner) as session: model.generate(...)`."""

    def __init__(self, model: nn.Module, pruner: Pruner):
        self.model = model
        self.pruner = pruner
        self.multimodal = model.model if hasattr(model, "lm_head") else model
        self.language_model = self.multimodal.language_model
        self.layers = self.language_model.layers
        self.config = model.config
        self.family = family_of(model)
        self._handles: list = []
        self._pending_visual: torch.Tensor | None = None
        self._record: PrefillRecord | None = None
        self._prefill_start: float | None = None
        self._decoding = False
        self._stash: dict[int, torch.Tensor] = {}
        self._decode_suffix: torch.Tensor | None = None
        self._decode_masks: dict[int, object] = {}
        self._injected: tuple | None = None  # (visual mask [B, T], per-layer inputs, row of each position)
        self.extras: dict = {}  # per-batch side information for pruners (e.g. the oracle's relevant tokens)

    # -- installation ---------------------------------------------------------------------------------------
    def __enter__(self) -> PruningSession:
        if getattr(self.model, _MARK, None) is not None:
            raise CovipalError("a pruner is already installed on this model; leave its `with` block first")
        self.pruner.setup(self.model)
        drop_layers = sorted(set(self.pruner.drop_layers))
        num_layers = len(self.layers)
        if any(layer < 0 or layer >= num_layers for layer in drop_layers):
            raise CovipalError(f"pruner drops at layers {drop_layers} but the LLM has layers 0..{num_layers - 1}")
        self._drop_layers = drop_layers
        self._inner_drops = [layer for layer in drop_layers if layer > 0]
        setattr(self.model, _MARK, self)
        try:
            self._handles.append(self.multimodal.register_forward_pre_hook(self._multimodal_hook, with_kwargs=True))
            self._handles.append(self.multimodal.register_forward_hook(self._multimodal_done))
            self._handles.append(
                self.language_model.register_forward_pre_hook(self._language_model_hook, with_kwargs=True)
            )
            for index in range(self.family.injected_layers(self.model)):
                self._handles.append(self.layers[index].register_forward_hook(self._make_inject_hook(index)))
            if self._inner_drops:
                watched = set(range(min(self._inner_drops) - 1, num_layers))
                for index in sorted(watched):
                    hook = self._make_layer_hook(index)
                    self._handles.append(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
            attach = getattr(self.pruner, "attach", None)
            if attach is not None:
                self._handles.extend(attach(self.model))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stash.clear()
        self._decode_masks.clear()
        self._injected = None
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)

    @property
    def record(self) -> PrefillRecord | None:
        """The last prefill's record (per-layer counts, kept positions)."""
        return self._record

    # -- hooks ----------------------------------------------------------------------------------------------
    def _multimodal_hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        self._decoding = cache is not None and cache.get_seq_length() > 0
        if self._decoding:
            # A generated token may equal a placeholder id; it is text unless new pixels come with it.
            if any(
                kwargs.get(key) is not None for key in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
            ):
                raise CovipalError("a call continuing a KV cache carries images or video; put them all in the prompt")
            self._pending_visual = None
            return None
        self._prefill_start = _now(self.model)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            self._pending_visual = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        else:
            self._pending_visual = visual_mask(self.config, input_ids)
        return None

    def _multimodal_done(self, module, args, output):
        if not self._decoding and self._record is not None and self._prefill_start is not None:
            self._record.prefill_seconds = _now(self.model) - self._prefill_start
            self._prefill_start = None

    def _language_model_hook(self, module, args, kwargs):
        kwargs, injected = self.family.split_layer_inputs(kwargs)
        self._injected = None if injected is None or self._decoding else self._injection(*injected)
        changed = (self._language_model_decode if self._decoding else self._language_model_prefill)(args, kwargs)
        return changed if changed is not None else (args, kwargs)

    @staticmethod
    def _injection(mask: torch.Tensor, inputs: list[torch.Tensor]) -> tuple:
        """The per-layer visual inputs with, for every original position, its row in them (row-major over the
        mask, as the model lays them out)."""
        mask = mask.bool()
        rows = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
        return mask, inputs, rows

    def _language_model_prefill(self, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        visual = self._pending_visual
        self._pending_visual = None
        if visual is None or visual.shape != (batch, length):
            visual = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
        mask = kwargs.get("attention_mask")
        if mask is not None and (isinstance(mask, dict) or mask.dim() != 2):
            raise CovipalError("pruning needs a 2D attention_mask (padding mask); got a prepared 4D mask")
        mask2d = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        position_ids = self.family.prefill_positions(kwargs.get("position_ids"), batch, length, embeds.device)
        n_visual = (visual & mask2d).sum(1)
        stage = Stage(0, None, mask2d, visual & mask2d, position_ids)
        self._record = PrefillRecord(n_visual=n_visual, stages=[stage], num_layers=len(self.layers), length=length)
        self._stash.clear()
        if 0 not in self._drop_layers or not bool(n_visual.any()):
            return None
        context = LayerContext(
            layer=0,
            hidden_states=embeds,
            previous_hidden_states=None,
            visual=stage.visual,
            attention_mask=mask2d,
            position_ids=position_ids,
            position_embeddings=None,
            n_visual=n_visual,
            language_model=self.language_model,
            extras=self.extras,
            source_index=torch.arange(length, device=embeds.device).expand(batch, length),
        )
        keep, merged = self._select(context)
        new = self._drop(stage, keep | ~stage.visual, layer=0)
        if new is None:
            return None
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = new.compaction.gather(embeds if merged is None else merged)
        kwargs["attention_mask"] = new.mask2d.to(mask.dtype if mask is not None else torch.long)
        kwargs["position_ids"] = new.position_ids
        return args, kwargs

    def _language_model_decode(self, args, kwargs):
        record = self._record
        self._decode_masks.clear()
        if record is None or len(record.stages) == 1:
            return None
        embeds = kwargs["inputs_embeds"]
        batch, steps = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        entry = record.stage_at(0)
        if mask is None:
            cached = kwargs["past_key_values"].get_seq_length(0)
            generated = cached - entry.mask2d.shape[1] + steps
            suffix = torch.ones(batch, generated, dtype=torch.bool, device=embeds.device)
        else:
            suffix = mask[:, record.length :].bool()
        self._decode_suffix = suffix
        if entry.compaction is None:  # only inner-layer drops: the model's own mask is right for early layers
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([entry.mask2d, suffix], dim=1).to(
            mask.dtype if mask is not None else torch.long
        )
        start = record.length + suffix.shape[1] - steps  # new tokens follow the original length
        positions = self.family.decode_positions(
            self.multimodal, kwargs.get("position_ids"), mask, start, steps, batch, embeds.device
        )
        if positions is not None:
            kwargs["position_ids"] = positions
        return (), kwargs

    def _make_inject_hook(self, index: int):
        def hook(module, args, output):
            return self._inject(index, output)

        return hook

    def _inject(self, index: int, output):
        """After layer `index`, add each visual token still in the sequence its own input for that layer."""
        if self._decoding or self._injected is None or self._record is None:
            return None
        mask, inputs, rows = self._injected
        if index >= len(inputs):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        stage = self._record.stages[-1]  # the tokens this layer ran on
        source = self._source_index(stage, hidden)
        take = stage.visual & mask.gather(1, source)
        hidden = hidden.clone()
        hidden[take] = hidden[take] + inputs[index][rows.gather(1, source)[take]].to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            return self._layer_hook(index, args, kwargs)

        return hook

    def _layer_hook(self, index: int, args, kwargs):
        record = self._record
        if record is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self._decoding:
            stage = record.stage_at(index)
            if stage.layer == 0:
                return None
            if stage.layer not in self._decode_masks:
                mask2d = torch.cat([stage.mask2d, self._decode_suffix], dim=1)
                self._decode_masks[stage.layer] = self._layer_mask(hidden, mask2d, kwargs, stage.layer)
            return (hidden, *args[1:]), {**kwargs, "attention_mask": self._decode_masks[stage.layer]}
        stage = record.stages[-1]
        if index in self._inner_drops and bool(record.n_visual.any()):
            embeddings = stage.position_embeddings or kwargs["position_embeddings"]
            context = LayerContext(
                layer=index,
                hidden_states=hidden,
                previous_hidden_states=self._stash.pop(index - 1, None),
                visual=stage.visual,
                attention_mask=stage.mask2d,
                position_ids=stage.position_ids,
                position_embeddings=embeddings,
                n_visual=record.n_visual,
                language_model=self.language_model,
                extras=self.extras,
                source_index=self._source_index(stage, hidden),
            )
            keep, merged = self._select(context)
            new = self._drop(stage, keep | ~stage.visual, index, embeddings)
            if new is not None:
                hidden = new.local.gather(hidden if merged is None else merged)
                new.layer_mask = self._layer_mask(hidden, new.mask2d, kwargs, index)
                stage = new
        if index + 1 in self._inner_drops:
            self._stash[index] = hidden
        if stage.layer == 0:
            return None
        kwargs = {
            **kwargs,
            "attention_mask": stage.layer_mask,
            "position_embeddings": stage.position_embeddings,
            "position_ids": self.family.layer_position_ids(stage.position_ids),
        }
        return (hidden, *args[1:]), kwargs

    # -- helpers --------------------------------------------------------------------------------------------
    @staticmethod
    def _source_index(stage: Stage, hidden: torch.Tensor) -> torch.Tensor:
        if stage.compaction is not None:
            return stage.compaction.index
        batch, length = hidden.shape[:2]
        return torch.arange(length, device=hidden.device).expand(batch, length)

    def _select(self, context: LayerContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pruner's keep mask and, for merging pruners, the hidden states to gather; timed into the record."""
        start = _now(self.model)
        choice = self.pruner.select(context)
        self._record.select_seconds += _now(self.model) - start
        if isinstance(choice, Merge):
            return choice.keep, choice.hidden_states
        return choice, None

    def _drop(self, stage: Stage, keep: torch.Tensor, layer: int, position_embeddings=None) -> Stage | None:
        """Record a new stage keeping `keep` (over the current stage's tokens); None if nothing is dropped.

        Padding is squeezed out along with the dropped tokens; rows are left-padded to the longest again."""
        if bool((keep | ~stage.mask2d).all()):
            return None
        local = Compaction.from_keep(keep & stage.mask2d)
        embeddings = None
        if position_embeddings is not None:
            embeddings = tuple(local.gather(t.expand(keep.shape[0], -1, -1)) for t in position_embeddings)
        new = Stage(
            layer=layer,
            compaction=local if stage.compaction is None else stage.compaction.compose(local),
            mask2d=local.gather_mask(stage.mask2d),
            visual=local.gather_mask(stage.visual),
            position_ids=local.gather_positions(stage.position_ids),
            position_embeddings=embeddings,
            local=local,
        )
        self._record.stages.append(new)
        return new

    def _layer_mask(self, hidden: torch.Tensor, mask2d: torch.Tensor, kwargs, layer: int):
        """The attention mask for a layer whose cache holds this stage's tokens, in the backend's own form."""
        return create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            past_key_values=kwargs.get("past_key_values"),
            position_ids=None,
            layer_idx=layer,
        )
