"""Loading the Qwen families (Qwen2.5-VL, Qwen3-VL; each test runs for both): a checkpoint through the same
`from_pretrained` path as LLaVA-OneVision, real shapes built from a spec for the bench, tower FLOPs as torch counts
them, the offline one-line error, and a processor that does not match."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch
from qwen_helpers import (
    QWEN_SPEC,
    SPECS,
    current_family,
    qwen_family,  # noqa: F401 (the autouse fixture: every test runs for each Qwen family)
    qwen_inputs,
    save_tiny_qwen,
)

from covipal.errors import CovipalError
from covipal.models.families import family_named, family_of
from covipal.models.loading import load_pretrained
from covipal.models.shapes import load_shaped

HUB_IDS = {"qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen3_vl": "Qwen/Qwen3-VL-8B-Instruct"}


def test_a_saved_qwen_loads_through_from_pretrained_and_answers(tmp_path):
    directory = save_tiny_qwen(tmp_path / "qwen")
    loaded = load_pretrained(str(directory), attn_implementation="sdpa", dtype="float32", device="cpu")
    assert family_of(loaded.model).name == current_family()
    inputs = qwen_inputs("image")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_processor_that_merges_otherwise_is_refused(tmp_path):
    directory = save_tiny_qwen(tmp_path / "qwen")
    other = tmp_path / "other"
    processor, _, _ = family_named(current_family()).from_spec(asdict(replace(SPECS[current_family()], patch_size=4)))
    processor.save_pretrained(other)
    with pytest.raises(CovipalError) as error:
        load_pretrained(str(directory), device="cpu", dtype="float32", processor_path=str(other))
    assert "patch 4" in str(error.value) and "\n" not in str(error.value)


def test_qwen_offline_without_weights_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CovipalError) as error:
        load_pretrained(HUB_IDS[current_family()], device="cpu")
    assert "\n" not in str(error.value) and "model.name_or_path=" in str(error.value)


def test_qwen_shapes_build_from_a_spec():
    spec = {"text_layers": 2, "text_hidden": 64, "vision_depth": 2, "fullatt_blocks": [1]}
    loaded = load_shaped(spec, "qwen_small_shapes", family=current_family(), dtype="float32", device="cpu")
    assert family_of(loaded.model).name == current_family()
    assert loaded.model.config.text_config.num_hidden_layers == 2
    assert loaded.model.config.real_vocab_size == 151646
    with pytest.raises(CovipalError, match="model family 'qwen9'"):
        load_shaped(spec, "x", family="qwen9", dtype="float32", device="cpu")


def test_qwen_tower_flops_equal_torch_flop_counter():
    """The family's description of its ViT's work (Qwen2.5-VL: windowed and full-attention blocks; Qwen3-VL: full
    attention, plain MLPs, DeepStack's mergers; patch embedding, merger) counts what torch counts, for images of
    two sizes and a video."""
    from torch.utils.flop_counter import FlopCounterMode

    from covipal.efficiency.flops import vision_flops

    model = qwen_model_for_flops()
    for kind in ("image", "batch", "video"):
        inputs = qwen_inputs(kind)
        pixels = inputs.get("pixel_values", inputs.get("pixel_values_videos"))
        grids = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model.visual(pixels, grid_thw=grids)
        work = family_of(model).tower_work(model.config.vision_config, grids.tolist())
        assert vision_flops(work) == counter.get_total_flops(), kind


def qwen_model_for_flops():
    from qwen_helpers import qwen_model

    return qwen_model("flops", backend="eager")  # eager: the attention products are plain matmuls torch can count


def test_generate_answers_on_qwen_batches_images_and_videos(tmp_path):
    """The function eval and the API share, on a saved tiny Qwen: batches of images of different sizes and of
    videos, pruned answers with exact budgets."""
    from conftest import random_image, random_video

    from covipal.data.sample import Sample
    from covipal.inference import generate_answers
    from covipal.pruning.random import RandomPruner

    directory = save_tiny_qwen(tmp_path / "qwen")
    loaded = load_pretrained(str(directory), attn_implementation="sdpa", dtype="float32", device="cpu")
    samples = [
        Sample("what colour is it?", images=[random_image(0, 64, 96)]),
        Sample("how many?", images=[random_image(1, 40, 40)]),
        Sample("what moves?", video=random_video(2, frames=8, size=32)),
        Sample("what moves first?", video=random_video(3, frames=8, size=32)),
    ]
    answers = generate_answers(loaded, RandomPruner(0.5), samples, max_new_tokens=3, batch_size=2, progress=False)
    assert [a.n_visual for a in answers] == [24, 4, 16, 16]
    for answer in answers:
        assert answer.layer_visual_tokens == [answer.n_visual // 2] * QWEN_SPEC.text_layers
        assert isinstance(answer.text, str)
