"""One measurement of one method on one input: prefill time, decode speed, KV-cache bytes, the pruner's own time,
the per-layer token counts (for FLOPs), and the bare reference the framework overhead is judged against.

The vision tower does the same work for every method, so it runs once per input (`encode`) and the LLM part is
timed on those precomputed features; vision-side methods record the tower facts they need in one full forward
first (`prime`) and add the time of their own tower-side scoring."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from covipal.models.families import family_of, visual_mask
from covipal.pruning.budget import keep_top_visual, visual_budget
from covipal.pruning.session import PruningSession
from covipal.pruning.vision_tokens import VisionTokens


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Encoded:
    """An input with its vision features computed once."""

    batch: dict  # processor outputs
    features: dict  # mm_encoder_outputs for the model's forward
    tower_seconds: float
    units: list  # the tower's work (crops, or grids), for its FLOPs (the family's `tower_work`)


def encode(model, batch: dict) -> Encoded:
    device = next(model.parameters()).device
    with torch.no_grad():
        start = now(device)
        features, units = family_of(model).encode_vision(model, batch)
        seconds = now(device) - start
    return Encoded(batch, features, seconds, units)


def text_inputs(encoded: Encoded) -> dict:
    """What the forward takes besides the features: ids, mask, and the inputs the model's positions need (Qwen's
    token types and grids)."""
    keep = (
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "image_grid_thw",
        "video_grid_thw",
        "second_per_grid_ts",
    )
    return {key: encoded.batch[key] for key in keep if key in encoded.batch}


def vision_side(pruner) -> VisionTokens | None:
    tokens = getattr(pruner, "tokens", None)
    return tokens if isinstance(tokens, VisionTokens) else None


def prime(model, pruner, encoded: Encoded) -> float:
    """For vision-side methods: one full forward records the tower facts, which are then frozen. Returns the
    time the method spent on its own tower-side scoring (0 for other methods)."""
    tokens = vision_side(pruner)
    if tokens is None:
        return 0.0
    tokens.frozen = True  # record once (the first forward after attaching), then keep
    tokens.tower_seconds = 0.0
    with torch.no_grad(), PruningSession(model, pruner):
        model(**encoded.batch, logits_to_keep=1)
    return tokens.tower_seconds


def kv_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Measurement:
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int
    select_seconds: float
    kv_bytes: int
    layer_tokens: list[int]  # tokens (text + visual) each LLM layer takes in, sample 0
    layer_visual: list[int]
    n_visual: int
    reserve_ratio: float
    record: object = None


def measure(model, pruner, encoded: Encoded, new_tokens: int) -> Measurement:
    """Prefill (from precomputed features) and `new_tokens` greedy decode steps with the KV cache."""
    device = next(model.parameters()).device
    inputs = text_inputs(encoded)
    with torch.no_grad(), PruningSession(model, pruner) as session:
        start = now(device)
        out = model(**inputs, mm_encoder_outputs=encoded.features, use_cache=True, logits_to_keep=1)
        prefill = now(device) - start
        cache = out.past_key_values
        kv = kv_cache_bytes(cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = inputs["attention_mask"]
        start = now(device)
        family = family_of(model)
        for _ in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            # the new token's position after the original sequence, as generate would give it
            positions = family.decode_positions(model.model, None, mask, mask.shape[1] - 1, 1, mask.shape[0], device)
            out = model(
                input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = now(device) - start
    record = session.record
    text = int(inputs["attention_mask"][0].sum()) - int(record.n_visual[0])
    visual = record.layer_visual_tokens[:, 0].tolist()
    return Measurement(
        prefill_seconds=prefill,
        decode_seconds=decode,
        new_tokens=new_tokens,
        select_seconds=record.select_seconds,
        kv_bytes=kv,
        layer_tokens=[text + v for v in visual],
        layer_visual=visual,
        n_visual=int(record.n_visual[0]),
        reserve_ratio=float(record.reserve_ratio[0]),
        record=record,
    )


def bare_reference(model, pruner, encoded: Encoded, record) -> float:
    """What a pre-LLM method costs with no framework around it: the model's input embeddings, the PPM (or the
    method's scores) and top-k, and one plain LLM call on the already-pruned sequence, then the LM head on the
    last row. Only for methods that drop before layer 0 and nowhere else."""
    device = next(model.parameters()).device
    inputs = text_inputs(encoded)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    config = model.config
    visual = visual_mask(config, ids)
    kept = record.kept
    with torch.no_grad():
        start = now(device)
        embeds = model.get_input_embeddings()(ids)
        values = family_of(model).feature_rows(encoded.features)
        embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), values.to(embeds.dtype))
        scorer = getattr(pruner, "ppm", None)
        if scorer is not None:
            scores = scorer(embeds, attention_mask=mask.bool())
            keep_top_visual(scores, visual, visual_budget(visual.sum(1), pruner.reserve_ratio))
        positions = family_of(model).original_positions(model.model, inputs)
        hidden = model.model.language_model(
            inputs_embeds=kept.gather(embeds),
            attention_mask=kept.valid.long(),
            position_ids=kept.gather_positions(positions),
            use_cache=True,
        ).last_hidden_state
        model.lm_head(hidden[:, -1:])
        return now(device) - start
