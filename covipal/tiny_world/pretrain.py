"""Pretraining a tiny model from scratch on the tiny world (vision tower, projector and LLM), whichever its family:
the ground truth the grounding terms read is laid out in the model's own visual tokens (`layout.layout_of`)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from covipal.data.chat import processor_inputs, user_message
from covipal.data.conversation import answer_labels
from covipal.data.sample import Sample
from covipal.errors import CovipalError
from covipal.models.families import visual_mask
from covipal.pruning.session import PruningSession
from covipal.tiny_world.grounding import answer_query_rows, grounding_losses, turn_relevance
from covipal.tiny_world.layout import layout_of
from covipal.tiny_world.oracle import FocusPruner
from covipal.tiny_world.samples import sample_stream
from covipal.tiny_world.synthetic import (
    IMAGE_QUESTION_TYPES,
    KEY_WORDS,
    ONEVISION,
    VIDEO_QUESTION_TYPES,
    TokenLayout,
)
from covipal.training.layer_input import LayerInputCapture


@dataclass
class PretrainRecipe:
    steps: int = 800
    batch_size: int = 16
    lr: float = 4e-4
    warmup: int = 50
    weight_decay: float = 0.01
    video_fraction: float = 0.25
    turns: int = 4  # questions per training conversation (one image or video, several answers supervised)
    mcq_fraction: float = 0.5
    kinds: list | None = None  # image question types to train on (None = all of IMAGE_QUESTION_TYPES)
    bf16: bool = False  # bf16 autocast (GPU; no faster than fp32 at the tiny model's size on CPU)
    seed: int = 0
    # (fraction of steps from which it applies, min objects, max objects): few objects first
    curriculum: list = field(default_factory=lambda: [[0.0, 1, 2], [0.2, 2, 3], [0.4, 3, 5], [0.6, 4, 7]])
    # (fraction of steps from which it applies, visual keep ratio): early steps see the objects' tokens and only a
    # few background tokens (token dropout through the oracle pruner), so grounding is learned without hundreds of
    # distracting tokens diluting the gradient; the last phase trains on the full input. A keep ratio may be a list:
    # each sample of a batch then draws one of them (seeded), so one phase mixes inputs with and without background.
    # An optional third entry says which objects' tokens are always kept: "scene" (every object, the default) or
    # "questions" (the objects the conversation's questions are about; the others drop like background, as under
    # the oracle pruner, so counting does not learn to lean on objects it does not count).
    focus: list = field(default_factory=lambda: [[0.0, 0.03], [0.6, 0.25], [0.8, 1.0]])
    # where a focus phase lists several keep ratios: "sample" draws one per sample, "batch" one per batch (a batch
    # that mixes full and dropped inputs is padded to the full length, so per batch halves the mixed phase's cost)
    focus_draw: str = "sample"
    # attention supervision (covipal/tiny_world/grounding.py): weight of its three terms, and the decoder layer l at
    # which each question row looks at its objects' tokens (key words at l-1, answer rows recall it at l+1)
    grounding_weight: float = 1.0
    grounding_layer: int = 1
    # a fourth term: the question row, read out by the LM head after layer l, predicts the first token of its
    # short answer (so the answer is looked up where the question row looks, and the answer rows only copy it)
    answer_probe: bool = False
    # counting questions' rows also spread their attention evenly over the counted objects' base-tile tokens
    # (grounding.attention_share_loss), so what they read depends on how many there are
    count_spread: bool = False
    # counting questions' rows attend evenly to the first token (a sink) and to one token per counted object
    # (`count_sink_targets`), so the share the sink keeps, 1/(n+1), tells how many there are. Replaces the image
    # targets of counting turns, and excludes `count_spread`
    count_sink: bool = False
    # {kind: [attention heads]}: the image term of those kinds' rows reads only these heads' mean attention (the
    # others' rows read all heads), so lookups with different keys (by place, by colour) need not share heads.
    # null = every kind reads all heads
    kind_heads: dict | None = None
    # (fraction of steps from which it applies, image question kinds or null = `kinds`): some kinds trained before
    # the others (docs/tiny_world_probes.md: not a robust gain so far); null = `kinds` throughout
    kind_phases: list | None = None
    # question kinds whose question row is their last key word, not their last "?" (grounding.key_word_rows): a
    # colour word's row finds objects by colour and a place word's row by place, so these lookups stop competing
    # for the one "?" row; the answer probe skips them. null = none
    key_word_kinds: list | None = None


def conversation(sample: Sample) -> list[dict]:
    """Chat messages: the visual input with the first question, then every further turn of `meta["turns"]`."""
    messages = [user_message(sample)]
    messages.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    for prompt, answer in sample.meta.get("turns", []):
        messages.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def training_batch(processor, samples: list[Sample]):
    """Processor outputs for whole conversations, with labels on the assistant answers only."""
    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(conversation(s), tokenize=False) for s in samples]
    batch = processor_inputs(processor, texts, samples)
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant", tokenizer.eos_token])
    batch["labels"] = answer_labels(batch["input_ids"], *ids)
    return batch


def _phase(table: list, steps: int, step: int) -> list:
    return [row for row in table if row[0] * steps <= step][-1]


def _objects_at(recipe: PretrainRecipe, step: int) -> tuple[int, int]:
    stage = _phase(recipe.curriculum, recipe.steps, step)
    return int(stage[1]), int(stage[2])


def _kinds_at(recipe: PretrainRecipe, step: int) -> tuple | None:
    kinds = _phase(recipe.kind_phases, recipe.steps, step)[1] if recipe.kind_phases else None
    kinds = recipe.kinds if kinds is None else kinds
    return None if kinds is None else tuple(kinds)


def focus_objects(recipe: PretrainRecipe, step: int) -> str:
    """Which objects the focus phase of `step` always keeps: "scene" or "questions" (see `PretrainRecipe.focus`)."""
    row = _phase(recipe.focus, recipe.steps, step)
    return str(row[2]) if len(row) > 2 else "scene"


def kept_objects(samples: list[Sample], which: str) -> list:
    """Per sample, the bool mask over its visual tokens that the focus dropout always keeps: every object of the
    scene, or the union of its turns' relevant tokens."""
    if which == "scene":
        return [s.meta["scene_relevance"] for s in samples]
    return [np.logical_or.reduce(s.meta.get("turn_relevance", [s.relevance])) for s in samples]


def keep_ratios(recipe: PretrainRecipe, step: int, batch: int) -> list[float]:
    """The visual keep ratio of each sample of `step`'s batch: the focus phase's ratio, or when the phase lists
    several, one drawn per sample (seeded by the recipe's seed and the step)."""
    keep = _phase(recipe.focus, recipe.steps, step)[1]
    if not isinstance(keep, (list, tuple)):
        return [float(keep)] * batch
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_033 + step)
    picks = torch.randint(len(keep), (batch if recipe.focus_draw == "sample" else 1,), generator=generator).tolist()
    picks = picks * (batch // len(picks))
    return [float(keep[i]) for i in picks]


def check_recipe(recipe: PretrainRecipe) -> None:
    """Refuse, in one line, an unknown question kind in `kinds` / `kind_phases` / `key_word_kinds` / `kind_heads`,
    phases that start after 0, both counting terms at once, or a malformed `focus` row."""
    lists = [("kinds", recipe.kinds)] + [
        (f"kind_phases[{i}]", row[1]) for i, row in enumerate(recipe.kind_phases or [])
    ]
    for name, kinds in lists:
        unknown = sorted(set(kinds or ()) - set(IMAGE_QUESTION_TYPES))
        if unknown or (kinds is not None and not kinds):
            raise CovipalError(
                f"pretrain.{name}={kinds} names no or unknown image question kinds {unknown}; "
                f"use some of {list(IMAGE_QUESTION_TYPES)} (or null for all)"
            )
    unknown = sorted(set(recipe.key_word_kinds or ()) - set(IMAGE_QUESTION_TYPES) - set(VIDEO_QUESTION_TYPES))
    if unknown:
        raise CovipalError(
            f"pretrain.key_word_kinds={recipe.key_word_kinds} names unknown question kinds {unknown}; "
            f"use some of {list(IMAGE_QUESTION_TYPES + VIDEO_QUESTION_TYPES)} (or null for none)"
        )
    unknown = sorted(set(recipe.kind_heads or {}) - set(IMAGE_QUESTION_TYPES) - set(VIDEO_QUESTION_TYPES))
    if unknown:
        raise CovipalError(
            f"pretrain.kind_heads names unknown question kinds {unknown}; "
            f"use some of {list(IMAGE_QUESTION_TYPES + VIDEO_QUESTION_TYPES)} (or null for none)"
        )
    if recipe.count_sink and recipe.count_spread:
        raise CovipalError(
            "pretrain.count_sink and pretrain.count_spread are both true; they set the same counting term, "
            "so set one of them to false"
        )
    if recipe.focus_draw not in ("sample", "batch"):
        raise CovipalError(f"pretrain.focus_draw={recipe.focus_draw!r} is not one of sample, batch")
    for index, row in enumerate(recipe.focus):
        ratios = row[1] if isinstance(row[1], (list, tuple)) else [row[1]]
        bad_ratio = not ratios or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios
        )
        if len(row) not in (2, 3) or bad_ratio or (len(row) == 3 and row[2] not in ("scene", "questions")):
            raise CovipalError(
                f"pretrain.focus[{index}]={list(row)} is not [from fraction, keep ratio in (0, 1] or a list of them, "
                f"optionally scene|questions]; e.g. [0.65, [0.25, 1.0], questions]"
            )
    if recipe.kind_phases and recipe.kind_phases[0][0] != 0:
        raise CovipalError(
            f"pretrain.kind_phases starts at {recipe.kind_phases[0][0]}; its first phase must start at 0.0"
        )


def turn_kinds(sample: Sample) -> list:
    """The question kind of each turn of a training conversation (a one-turn sample: its own kind)."""
    return sample.meta.get("turn_kinds", [sample.meta.get("type")])


def counted_tokens(samples: list[Sample], base_tokens: int) -> list[list]:
    """Per sample and turn: for counting turns, the relevant tokens of the coarsest view (the first `base_tokens`
    visual tokens of an image: LLaVA-OneVision's base tile), else None."""
    out = []
    for sample in samples:
        masks = sample.meta.get("turn_relevance", [sample.relevance])
        kinds = turn_kinds(sample)
        row = []
        for mask, kind in zip(masks, kinds):
            counted = None
            if kind == "counting":
                counted = mask.copy()
                counted[base_tokens:] = False
            row.append(counted)
        out.append(row)
    return out


def count_sink_targets(
    samples: list[Sample], visual: torch.Tensor, attention_mask: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image targets, tokens to spread evenly over), both [B, turns, T]: for counting turns, the first attended
    token plus each counted object's anchor token (`meta["turn_anchors"]`); other turns keep their `relevance` and
    spread over nothing."""
    turns = relevance.shape[1]
    counting = keyed_turns(samples, ["counting"], turns).to(relevance.device)
    anchors = [
        [s.meta["turn_anchors"][turn] if kind == "counting" else None for turn, kind in enumerate(turn_kinds(s))]
        for s in samples
    ]
    first = torch.zeros_like(attention_mask, dtype=torch.bool)
    first[torch.arange(len(samples)), attention_mask.long().argmax(1)] = True  # padding may be on the left
    sink = turn_relevance(visual, anchors) | (counting[..., None] & first[:, None, :])
    return torch.where(counting[..., None], sink, relevance), sink


def turn_heads(samples: list[Sample], kind_heads: dict | None, turns: int, heads: int) -> torch.Tensor | None:
    """[B, turns, heads] bool: the attention heads each turn's image term reads (`PretrainRecipe.kind_heads`;
    None when it is empty)."""
    if not kind_heads:
        return None
    chosen = torch.ones(len(samples), turns, heads, dtype=torch.bool)
    for row, sample in enumerate(samples):
        for turn, kind in enumerate(turn_kinds(sample)[:turns]):
            if kind in kind_heads:
                chosen[row, turn] = False
                chosen[row, turn, list(kind_heads[kind])] = True
    return chosen


def keyed_turns(samples: list[Sample], kinds, turns: int) -> torch.Tensor | None:
    """[B, turns] bool: the turns whose kind is among `kinds` (None when `kinds` is empty)."""
    if not kinds:
        return None
    keyed = torch.zeros(len(samples), turns, dtype=torch.bool)
    for row, sample in enumerate(samples):
        for turn, kind in enumerate(turn_kinds(sample)[:turns]):
            keyed[row, turn] = kind in kinds
    return keyed


def grounding_token_ids(tokenizer) -> dict:
    """Token ids the grounding terms need: role, message end, question mark and the key words."""
    user, end, mark = tokenizer.convert_tokens_to_ids(["user", tokenizer.eos_token, "?"])
    return {
        "user": user,
        "end": end,
        "mark": mark,
        "keywords": torch.tensor(tokenizer.convert_tokens_to_ids(KEY_WORDS)),
        "tokenizer": tokenizer,
    }


def short_answer_ids(samples: list[Sample], tokenizer, turns: int) -> torch.Tensor:
    """[B, turns] long: the first token of each turn's short answer (-1 where a sample has fewer turns)."""
    answers = torch.full((len(samples), turns), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        texts = sample.meta.get("turn_short_answers", [sample.meta.get("short_answer")])
        for turn, text in enumerate(texts[:turns]):
            if text is not None:
                answers[row, turn] = tokenizer(str(text), add_special_tokens=False).input_ids[0]
    return answers


def pretraining_loss(
    model,
    batch: dict,
    samples: list[Sample],
    keep_ratio: float | list[float],
    recipe: PretrainRecipe,
    ids: dict,
    seed: int = 0,
    focus_on: str = "scene",
    layout: TokenLayout = ONEVISION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer cross-entropy, sum of the grounding terms) with only the kept objects' tokens plus a random
    `keep_ratio` share of the other visual tokens (token dropout through the pruning session; 1 = the full input;
    a list: one ratio per sample; `focus_on`: which objects are always kept, `kept_objects`). `ids`:
    `grounding_token_ids(tokenizer)`; `layout`: where the samples' ground truth lies in the model's tokens."""
    labels = batch.pop("labels")
    config = model.config
    input_ids = batch["input_ids"]
    visual = visual_mask(config, input_ids)
    layer = recipe.grounding_layer
    with contextlib.ExitStack() as stack:
        layers = (layer - 1, layer, layer + 1) if recipe.grounding_weight else ()
        captures = tuple(stack.enter_context(LayerInputCapture(model, index)) for index in layers)
        session = None
        if min(keep_ratio if isinstance(keep_ratio, (list, tuple)) else [keep_ratio]) < 1.0:
            session = stack.enter_context(PruningSession(model, FocusPruner(keep_ratio, seed)))
            session.extras = {"relevance": kept_objects(samples, focus_on)}
        logits = model(**batch).logits
    kept = session.record.kept if session is not None else None
    grounding = logits.new_zeros(())
    if recipe.grounding_weight:
        relevance = turn_relevance(visual, [s.meta.get("turn_relevance", [s.relevance]) for s in samples])
        mask = batch["attention_mask"].bool()
        probe = None
        if recipe.answer_probe:
            answers = short_answer_ids(samples, ids["tokenizer"], relevance.shape[1]).to(input_ids.device)
            language = model.model.language_model
            probe = (lambda hidden: model.lm_head(language.norm(hidden)), answers)
        spread = None
        if recipe.count_spread:
            _, rows, columns, _ = layout.image_panels[0]
            spread = turn_relevance(visual, counted_tokens(samples, rows * columns))
        if recipe.count_sink:
            relevance, spread = count_sink_targets(samples, visual, batch["attention_mask"], relevance)
        answer_rows = answer_query_rows(labels)
        keyed = keyed_turns(samples, recipe.key_word_kinds, relevance.shape[1])
        keyed = None if keyed is None else keyed.to(input_ids.device)
        heads = turn_heads(samples, recipe.kind_heads, relevance.shape[1], config.text_config.num_attention_heads)
        heads = None if heads is None else heads.to(input_ids.device)
        terms = grounding_losses(
            captures, input_ids, mask, answer_rows, relevance, ids, kept, probe, spread, keyed, heads
        )
        grounding = sum(terms)
    if kept is not None:  # labels follow the tokens that stayed
        labels = torch.where(kept.valid, labels.gather(1, kept.index), torch.full_like(kept.index, -100))
    answer = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    return answer, grounding


def batches(processor, recipe: PretrainRecipe, layout: TokenLayout = ONEVISION):
    """Seeded batches following the curriculum and the kind phases, their ground truth in `layout`; image and
    video samples go in separate batches."""
    streams = {}
    for step in range(recipe.steps):
        key = (_objects_at(recipe, step), _kinds_at(recipe, step))
        if key not in streams:
            streams[key] = (
                sample_stream(
                    recipe.seed * 1000 + len(streams), 0.0, recipe.mcq_fraction, key[0], recipe.turns, key[1], layout
                ),
                sample_stream(
                    recipe.seed * 1000 + 500 + len(streams), 1.0, recipe.mcq_fraction, turns=recipe.turns, layout=layout
                ),
            )
        images, videos = streams[key]
        video = int((step + 1) * recipe.video_fraction) > int(step * recipe.video_fraction)
        samples = list(islice(videos if video else images, recipe.batch_size))
        yield training_batch(processor, samples), samples


def pretrain(model, processor, recipe: PretrainRecipe, progress: bool = True) -> list[dict]:
    """Train every parameter of `model` on the tiny world; returns the per-step log."""
    layers = model.config.text_config.num_hidden_layers
    if recipe.grounding_weight and not 1 <= recipe.grounding_layer <= layers - 2:
        raise CovipalError(
            f"pretrain.grounding_layer={recipe.grounding_layer} but it needs a layer before and after it among the "
            f"LLM's layers 0..{layers - 1}; pick one of 1..{layers - 2}"
        )
    check_recipe(recipe)
    heads = model.config.text_config.num_attention_heads
    for kind, chosen in (recipe.kind_heads or {}).items():
        if not chosen or not all(0 <= int(h) < heads for h in chosen):
            raise CovipalError(
                f"pretrain.kind_heads.{kind}={list(chosen)} must name some of the LLM's attention heads 0..{heads - 1}"
            )
    ids = grounding_token_ids(processor.tokenizer)
    torch.manual_seed(recipe.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )

    def schedule(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress_ = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    log = []
    start = time.perf_counter()
    layout = layout_of(model, processor)
    bar = tqdm(batches(processor, recipe, layout), total=recipe.steps, desc="pretrain", disable=not progress)
    average = None
    device = next(model.parameters()).device
    for step, (batch, samples) in enumerate(bar):
        ratios = keep_ratios(recipe, step, len(samples))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
            seed, focus_on = recipe.seed * 1_000_003 + step, focus_objects(recipe, step)
            answer, grounding = pretraining_loss(model, batch, samples, ratios, recipe, ids, seed, focus_on, layout)
            loss = answer + recipe.grounding_weight * grounding
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value, ground = answer.item(), grounding.item()
        average = (
            (value, ground) if average is None else tuple(0.98 * a + 0.02 * v for a, v in zip(average, (value, ground)))
        )
        seconds = time.perf_counter() - start
        log.append(
            {
                "step": step,
                "loss": value,
                "grounding": ground,
                "lr": scheduler.get_last_lr()[0],
                "keep": sum(ratios) / len(ratios),
                "seconds": seconds,
            }
        )
        bar.set_postfix(loss=f"{average[0]:.3f}", grounding=f"{average[1]:.3f}")
        if not progress and (step + 1) % 50 == 0:
            print(
                f"pretrain step {step + 1}/{recipe.steps} loss {average[0]:.3f} grounding {average[1]:.3f}", flush=True
            )
    model.eval()
    return log
