"""Pretraining the tiny model: labels cover the answers only, a short run lowers the loss and is deterministic,
and the result is cached and loaded through the normal model path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from covipal.errors import CovipalError
from covipal.models.architecture import ArchitectureSpec
from covipal.pruning.none import NoPruner
from covipal.pruning.random import RandomPruner
from covipal.tiny_world.accuracy import accuracy
from covipal.tiny_world.model import build_tiny, load_tiny, tiny_base_checkpoint
from covipal.tiny_world.pretrain import (
    PretrainRecipe,
    batches,
    focus_objects,
    keep_ratios,
    kept_objects,
    pretrain,
    training_batch,
)
from covipal.tiny_world.samples import image_sample

# The tiny world's geometry (128-px images -> 336 visual tokens) at a width small enough for fast tests.
SMALL_WORLD = dict(
    image_size=64,
    patch_size=8,
    grid_pinpoints=[[64, 64], [64, 128], [128, 64], [128, 128]],
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=1,
    vision_feature_layer=-2,
    text_hidden=48,
    text_intermediate=96,
    text_layers=3,  # the grounding terms use layers 0, 1 and 2
    words=["bigger", "letter", "correct", "option", "single"],
)


def small_model(tmp_path, name="m"):
    directory = build_tiny(ArchitectureSpec(**SMALL_WORLD), tmp_path / name)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory)
    return model, AutoProcessor.from_pretrained(directory)


def test_labels_cover_exactly_the_answers(tmp_path):
    _, processor = small_model(tmp_path)
    samples = [image_sample(np.random.default_rng(i), "mcq", turns=3) for i in range(2)]
    batch = training_batch(processor, samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        labels = batch["labels"][row]
        answers = [sample.answer] + [answer for _, answer in sample.meta["turns"]]
        expected = " ".join(f"{answer} {tokenizer.eos_token}" for answer in answers)
        assert tokenizer.decode(labels[labels != -100]) == tokenizer.decode(tokenizer(expected).input_ids)
        assert int((batch["input_ids"][row] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 336


def test_short_pretraining_lowers_the_loss_and_is_deterministic(tmp_path):
    default_terms = dict(  # the tiny default's terms and focus phases (configs/model/tiny.yaml), on images and videos
        answer_probe=True,
        count_sink=True,
        kind_heads={"attribute_at_location": [0, 1], "counting": [2, 3]},
        focus=[[0.0, 0.03], [0.5, [0.25, 1.0], "questions"]],
    )
    recipe = PretrainRecipe(steps=30, batch_size=4, lr=2e-3, warmup=5, turns=2, video_fraction=0.25, **default_terms)
    model, processor = small_model(tmp_path, "a")
    log = pretrain(model, processor, recipe, progress=False)
    losses = [entry["loss"] for entry in log]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    again, _ = small_model(tmp_path, "b")
    short = PretrainRecipe(steps=3, batch_size=2, turns=2, **default_terms)
    pretrain(again, processor, short, progress=False)
    third, _ = small_model(tmp_path, "c")
    pretrain(third, processor, short, progress=False)
    for (name, a), b in zip(again.state_dict().items(), third.state_dict().values()):
        assert torch.equal(a, b), name


def test_pretrained_checkpoint_is_cached_and_loads_like_real_weights(tmp_path):
    recipe = PretrainRecipe(steps=2, batch_size=2, turns=1)
    directory = tiny_base_checkpoint(ArchitectureSpec(**SMALL_WORLD), recipe, tmp_path)
    assert json.loads((directory / "pretrain_recipe.json").read_text())["steps"] == 2
    assert len(json.loads((directory / "pretrain_log.json").read_text())) == 2
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    loaded = load_tiny(
        spec=SMALL_WORLD,
        pretrain={"steps": 2, "batch_size": 2, "turns": 1},
        cache_dir=str(tmp_path),
    )
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # not trained again
    untrained = LlavaOnevisionForConditionalGeneration.from_pretrained(
        build_tiny(ArchitectureSpec(**SMALL_WORLD), tmp_path / "init")
    )
    weight = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(loaded.model.state_dict()[weight], untrained.state_dict()[weight])


@pytest.mark.slow
def test_a_short_pretraining_answers_held_out_questions_better_than_chance(tmp_path):
    """Where is the object? (four places, chance 25%) on one-object scenes: a few hundred steps of the recipe's
    focus curriculum and attention supervision, then the checkpoint through the normal load path and generation,
    on the full input and with nearly all visual tokens pruned away."""
    recipe = {
        "steps": 300,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup": 20,
        "turns": 1,
        "video_fraction": 0.0,
        "mcq_fraction": 0.0,
        "kinds": ["location_of_attribute"],
        "curriculum": [[0.0, 1, 1]],
        "focus": [[0.0, 0.03], [0.7, 1.0]],
    }
    loaded = load_tiny(spec=SMALL_WORLD, pretrain=recipe, cache_dir=str(tmp_path))
    rng = np.random.default_rng(123_456)  # training streams use seeds below 1000
    held_out = [image_sample(rng, "short", ("location_of_attribute",), 1, 1) for _ in range(64)]
    full = accuracy(loaded, NoPruner(), held_out)["accuracy"]
    nearly_blind = accuracy(loaded, RandomPruner(0.05), held_out)["accuracy"]  # the object's tokens mostly gone
    assert full >= 0.4, full  # 0.52 here; chance is 0.25 and 0.4 is 2.8 standard errors above it
    assert nearly_blind <= full - 0.1, (full, nearly_blind)  # 0.27 here


def test_kind_phases_train_each_phase_on_its_kinds_and_bad_kinds_are_refused(tmp_path):
    _, processor = small_model(tmp_path)
    phases = [[0.0, ["attribute_at_location"]], [0.5, None]]
    recipe = PretrainRecipe(steps=4, batch_size=3, turns=2, video_fraction=0.0, kinds=["counting"], kind_phases=phases)
    seen = [{k for s in samples for k in s.meta["turn_kinds"]} for _, samples in batches(processor, recipe)]
    assert seen[:2] == [{"attribute_at_location"}] * 2 and seen[2] | seen[3] == {"counting"}
    model, _ = small_model(tmp_path, "b")
    for bad, match in (
        ({"kinds": ["colour"]}, r"pretrain.kinds=\['colour'\] .*\['colour'\]"),
        ({"kind_phases": [[0.0, ["counting"]], [0.5, []]]}, r"pretrain.kind_phases\[1\]=\[\]"),
        ({"kind_phases": [[0.2, ["counting"]]]}, "first phase must start at 0.0"),
        ({"key_word_kinds": ["colour"]}, r"pretrain.key_word_kinds=\['colour'\] names unknown question kinds"),
        ({"focus": [[0.0, [0.25, 1.5]]]}, r"pretrain.focus\[0\]=\[0.0, \[0.25, 1.5\]\] is not"),
        ({"focus": [[0.0, 0.25, "all"]]}, r"pretrain.focus\[0\]=.* optionally scene\|questions"),
        ({"focus_draw": "step"}, r"pretrain.focus_draw='step' is not one of sample, batch"),
    ):
        with pytest.raises(CovipalError, match=match):
            pretrain(model, processor, PretrainRecipe(steps=1, batch_size=1, **bad), progress=False)


def test_focus_phases_draw_a_keep_ratio_per_sample_and_can_drop_the_objects_no_question_is_about():
    recipe = PretrainRecipe(steps=10, focus=[[0.0, 0.03], [0.5, [0.25, 1.0], "questions"]])
    assert keep_ratios(recipe, 0, 4) == [0.03] * 4 and focus_objects(recipe, 4) == "scene"
    drawn = [keep_ratios(recipe, step, 16) for step in range(5, 10)]
    assert drawn == [keep_ratios(recipe, step, 16) for step in range(5, 10)]  # seeded
    assert {r for row in drawn for r in row} == {0.25, 1.0} and focus_objects(recipe, 5) == "questions"
    per_batch = PretrainRecipe(steps=10, focus=recipe.focus, focus_draw="batch")
    drawn = [keep_ratios(per_batch, step, 16) for step in range(5, 10)]
    assert all(len(set(row)) == 1 and len(row) == 16 for row in drawn) and {row[0] for row in drawn} == {0.25, 1.0}
    rng = np.random.default_rng(0)
    samples = [image_sample(rng, "short", kinds=("counting", "location_of_attribute"), turns=3) for _ in range(8)]
    for sample, scene, asked in zip(samples, kept_objects(samples, "scene"), kept_objects(samples, "questions")):
        assert np.array_equal(scene, sample.meta["scene_relevance"])
        assert np.array_equal(asked, np.logical_or.reduce(sample.meta["turn_relevance"]))
        assert not (asked & ~scene).any()
    assert any(
        (scene & ~asked).any()
        for scene, asked in zip(kept_objects(samples, "scene"), kept_objects(samples, "questions"))
    )
