"""The tiny world on a second family: its ground truth laid out in the tiny Qwen2.5-VL's visual tokens (read off the
model and processor), checked against the pixels the processor hands each token; benchmarks' ground truth in that
layout beside the tiny LLaVA-OneVision's; `model=tiny_qwen` built, cached and pretrained through the same path."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from covipal import api
from covipal.data.sample import Sample
from covipal.inference import generate_answers
from covipal.models.families import family_named, visual_mask
from covipal.models.loading import LoadedModel
from covipal.pruning.none import NoPruner
from covipal.tiny_world.export import (
    benchmark_relevance,
    benchmark_samples,
    ensure_benchmarks,
    oracle_path,
)
from covipal.tiny_world.layout import layout_of
from covipal.tiny_world.model import load_tiny
from covipal.tiny_world.oracle import OraclePruner
from covipal.tiny_world.pretrain import PretrainRecipe, pretrain
from covipal.tiny_world.samples import image_sample, video_sample
from covipal.tiny_world.synthetic import (
    COLOURS,
    ONEVISION,
    Scene,
    SceneObject,
    TokenLayout,
    VideoObject,
    VideoScene,
    image_token_anchors,
    image_token_relevance,
    video_token_relevance,
)

CONFIGS = "configs/model"
QWEN_LAYOUT = TokenLayout(((0, 8, 8, 8),), 64, 2, 4, 4, 64, "qwen2_5_vl")


def config_spec(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(f"{CONFIGS}/{name}.yaml").spec)


@pytest.fixture(scope="module")
def tiny_qwen():
    """The untrained model=tiny_qwen architecture (seeded) and its processor, as the config builds it."""
    processor, config, spec = family_named("qwen2_5_vl").from_spec(config_spec("tiny_qwen"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def test_each_models_layout_is_read_off_the_model_and_its_processor(tiny_qwen):
    processor, config, _ = family_named("llava_onevision").from_spec(config_spec("tiny"))
    onevision = LlavaOnevisionForConditionalGeneration._from_config(config)
    assert layout_of(onevision, processor) == ONEVISION  # the constant the default samples are generated with
    assert layout_of(*tiny_qwen) == QWEN_LAYOUT
    processor, config, _ = family_named("qwen3_vl").from_spec(config_spec("tiny_qwen3"))
    qwen3 = family_named("qwen3_vl").model_class._from_config(config)
    assert layout_of(qwen3, processor) == replace(QWEN_LAYOUT, name="qwen3_vl")  # timestamps between frame pairs


def qwen_processed(processor, sample) -> dict:
    content = [{"type": "image"}] if sample.images else [{"type": "video"}]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    media = {"images": sample.images} if sample.images else {"videos": [sample.video]}
    return processor(text=text, return_tensors="pt", **media)


def token_pixels(processor, values: torch.Tensor, grid) -> np.ndarray:
    """[steps, rows, columns, frames, 16, 16, 3] uint8: the pixels each merged token of a processor output holds,
    undoing the processor's patch order and normalisation."""
    made = processor.image_processor
    merge, patch, frames = made.merge_size, made.patch_size, made.temporal_patch_size
    steps, height, width = (int(v) for v in grid)
    patches = values.reshape(steps, height // merge, width // merge, merge, merge, 3, frames, patch, patch)
    # -> steps, rows, columns, frames, (merge row, patch row), (merge col, patch col), channel
    tokens = patches.permute(0, 1, 2, 6, 3, 7, 4, 8, 5).reshape(
        steps, height // merge, width // merge, frames, merge * patch, merge * patch, 3
    )
    mean, std = torch.tensor(made.image_mean), torch.tensor(made.image_std)
    return (tokens * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def red_tokens(pixels: np.ndarray) -> np.ndarray:
    """Per token, whether any of its pixels is the red of COLOURS (in any of its frames)."""
    red = np.all(np.abs(pixels.astype(int) - np.array(COLOURS["red"])) <= 2, axis=-1)
    return red.any(axis=(3, 4, 5)).reshape(-1)


def test_qwens_image_ground_truth_marks_the_tokens_that_show_the_object(tiny_qwen):
    """Token k of the Qwen layout holds the 16-px block (k // 8, k % 8) of the image — read back from the processor's
    pixel values — and the tokens marked relevant are exactly those showing the object."""
    _, processor = tiny_qwen
    for obj in (SceneObject("square", "red", True, 3, 11), SceneObject("square", "red", False, 9, 4)):
        scene = Scene([obj])
        sample = Sample("?", images=[scene.render()])
        out = qwen_processed(processor, sample)
        pixels = token_pixels(processor, out["pixel_values"], out["image_grid_thw"][0])
        blocks = np.asarray(scene.render()).reshape(8, 16, 8, 16, 3).transpose(0, 2, 1, 3, 4)
        assert np.abs(pixels[0, :, :, 0].astype(int) - blocks).max() <= 2  # token (r, c) = pixel block (r, c)
        relevance = image_token_relevance(scene, [0], QWEN_LAYOUT)
        assert np.array_equal(relevance, red_tokens(pixels)) and relevance.sum() == (4 if obj.large else 1)
        assert np.array_equal(relevance, image_token_relevance(scene, [0])[:64])  # = the 16-px base tile of OneVision
        anchors = image_token_anchors(scene, [0], QWEN_LAYOUT)
        assert np.flatnonzero(anchors).tolist() == [obj.row // 2 * 8 + obj.col // 2]


def test_qwens_video_ground_truth_covers_each_frame_pair_the_object_shows_in(tiny_qwen):
    _, processor = tiny_qwen
    scene = VideoScene([VideoObject("square", "red", start=1, end=4, x=10, y=24, dx=4)])  # moves 4 px a frame
    sample = Sample("?", video=scene.render())
    out = qwen_processed(processor, sample)
    pixels = token_pixels(processor, out["pixel_values_videos"], out["video_grid_thw"][0])
    relevance = video_token_relevance(scene, [0], QWEN_LAYOUT)
    assert np.array_equal(relevance, red_tokens(pixels))
    per_frame = video_token_relevance(scene, [0])[:-1].reshape(4, 2, 16)  # OneVision: a 4x4 grid per frame
    assert np.array_equal(relevance.reshape(4, 16), per_frame.any(axis=1))
    assert relevance[:16].any() and relevance[32:48].any() and not relevance[48:].any()  # frames 1-4 of 0-7


def test_qwen_layout_samples_match_the_processors_placeholders(tiny_qwen):
    model, processor = tiny_qwen
    for sample in (image_sample(np.random.default_rng(3), "mcq", layout=QWEN_LAYOUT, turns=2),
                   video_sample(np.random.default_rng(3), "short", layout=QWEN_LAYOUT)):  # fmt: skip
        ids = qwen_processed(processor, sample)["input_ids"]
        assert int(visual_mask(model.config, ids).sum()) == len(sample.relevance) == 64
        assert all(len(mask) == 64 for mask in sample.meta["turn_relevance"] + [sample.meta["scene_relevance"]])
        assert 0 < sample.relevance.sum() < 32


def test_benchmarks_gain_a_qwen_oracle_beside_the_onevision_one(tmp_path):
    root = tmp_path / "LMUData"
    ensure_benchmarks(root, ["TinyWorld_MCQ"], 6, progress=False)
    tsv, onevision = root / "TinyWorld_MCQ.tsv", oracle_path(root, "TinyWorld_MCQ")
    stamps = tsv.stat().st_mtime_ns, onevision.stat().st_mtime_ns
    ensure_benchmarks(root, ["TinyWorld_MCQ"], 6, progress=False, layout=QWEN_LAYOUT)
    qwen = oracle_path(root, "TinyWorld_MCQ", QWEN_LAYOUT)
    assert qwen != onevision and (tsv.stat().st_mtime_ns, onevision.stat().st_mtime_ns) == stamps  # only added
    rows = [json.loads(line) for line in qwen.read_text().splitlines()]
    expected = benchmark_samples("TinyWorld_MCQ", 6, layout=QWEN_LAYOUT)
    assert [r["relevant"] for r in rows] == [np.flatnonzero(s.relevance).tolist() for s in expected]
    assert {r["visual_tokens"] for r in rows} == {64}
    stamp = qwen.stat().st_mtime_ns
    ensure_benchmarks(root, ["TinyWorld_MCQ"], 4, progress=False, layout=QWEN_LAYOUT)
    assert qwen.stat().st_mtime_ns == stamp  # there already
    lookup = benchmark_relevance(root, "TinyWorld_MCQ", QWEN_LAYOUT)
    mask = lookup([{"type": "image", "value": str(root / "images" / "TinyWorld_MCQ" / "5.png")}])
    assert np.array_equal(mask, expected[5].relevance)
    ensure_benchmarks(root, ["TinyWorld_MCQ"], 8, progress=False, layout=QWEN_LAYOUT)  # more rows: both rewritten
    assert len(qwen.read_text().splitlines()) == len(onevision.read_text().splitlines()) == 8


def test_the_oracle_keeps_every_relevant_qwen_token_within_its_budget(tiny_qwen):
    model, processor = tiny_qwen
    loaded = LoadedModel(model=model, processor=processor, name="tiny_qwen")
    samples = [s for s in benchmark_samples("TinyWorld_MCQ", 12, layout=QWEN_LAYOUT) if s.relevance.sum() <= 16][:4]
    answers = generate_answers(loaded, OraclePruner(0.25), samples, max_new_tokens=1, progress=False)
    layers = len(model.model.language_model.layers)
    assert [a.relevant_kept for a in answers] == [[1.0] * layers] * len(samples)
    assert [a.layer_visual_tokens for a in answers] == [[16] * layers] * len(samples)
    unpruned = generate_answers(loaded, NoPruner(), samples[:1], max_new_tokens=1, progress=False)
    assert unpruned[0].relevant_kept == [1.0] * layers


def test_model_tiny_qwen_builds_pretrains_and_loads_like_real_weights(tmp_path):
    """model=tiny_qwen through the config: a few pretraining steps on the tiny world (grounding terms included)
    lower the loss, and the checkpoint is cached and loaded through from_pretrained."""
    cfg = api.compose("eval", ["model=tiny_qwen", f"model.cache_dir={tmp_path}"])
    assert OmegaConf.to_container(cfg.model.pretrain) == OmegaConf.to_container(api.compose("eval", []).model.pretrain)
    spec = {**OmegaConf.to_container(cfg.model.spec), "text_layers": 3, "text_hidden": 48, "text_intermediate": 96}
    spec["mrope_section"] = [2, 2, 2]
    recipe = dict(steps=40, batch_size=4, lr=2e-3, warmup=4, turns=2, video_fraction=0.25, answer_probe=True,
                  count_sink=True, kind_heads={"attribute_at_location": [0, 1]},
                  focus=[[0.0, 0.03], [0.5, [0.25, 1.0], "questions"]])  # fmt: skip
    loaded = load_tiny(spec=spec, pretrain=recipe, family="qwen2_5_vl", cache_dir=str(tmp_path), name="tiny_qwen")
    assert isinstance(loaded.model, Qwen2_5_VLForConditionalGeneration) and loaded.name == "tiny_qwen"
    (directory,) = tmp_path.glob("tiny-base-*")
    log = json.loads((directory / "pretrain_log.json").read_text())
    losses = [entry["loss"] for entry in log]
    assert all(np.isfinite(losses)) and all(np.isfinite(entry["grounding"]) for entry in log)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    load_tiny(spec=spec, pretrain=recipe, family="qwen2_5_vl", cache_dir=str(tmp_path))
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not trained again


def test_count_spread_reads_the_coarsest_view_of_any_layout(tiny_qwen):
    """`count_spread` reads the coarsest view of the layout (OneVision's base tile; Qwen's one grid)."""
    model, processor = tiny_qwen
    recipe = PretrainRecipe(steps=1, batch_size=2, turns=2, video_fraction=0.0, count_spread=True,
                            kinds=["counting"], focus=[[0.0, 1.0]])  # fmt: skip
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        log = pretrain(model, processor, recipe, progress=False)
    finally:
        model.load_state_dict(state)
        model.eval()
    assert np.isfinite(log[0]["loss"]) and log[0]["grounding"] > 0
