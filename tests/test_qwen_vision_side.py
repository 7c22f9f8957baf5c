"""Vision-side pruners on the tiny Qwen2.5-VL: the tower facts laid out over the LLM's merged visual tokens (views
per image and per pair of frames, rows and columns on the merged grid, the tower's window order undone), budgets
split by Qwen's grids, a padded batch equal to each sample alone, generate keeping what a forward keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pruning_helpers import floor_budget, hook_counts, tower_facts
from qwen_helpers import (
    QWEN_LAYERS,
    current_family,
    qwen_batch_samples,
    qwen_family,  # noqa: F401 (the autouse fixture: every test runs for each Qwen family)
    qwen_inputs,
    qwen_model,
    qwen_processor,
    qwen_prompt,
)

from covipal.models.families import family_of, visual_mask
from covipal.models.families.rows import VIDEO_VIEWS
from covipal.pruning.pool import PoolPruner
from covipal.pruning.session import PruningSession
from covipal.pruning.visionzip import VisionZipPruner
from covipal.pruning.vitcop import ViTCoPPruner, vitcop_counts

VITCOP_LAYERS = [1, 3]
METHODS = ["visionzip", "vitcop", "pool"]


def make(name: str, ratio: float):
    if name == "visionzip":
        return VisionZipPruner(ratio)
    if name == "vitcop":
        return ViTCoPPruner(ratio, layers=VITCOP_LAYERS)
    if name == "pool":
        return PoolPruner(ratio)
    raise ValueError(name)


def run(model, pruner, inputs):
    with torch.no_grad(), PruningSession(model, pruner) as session:
        logits = model(**inputs).logits
    return session.record, logits


def test_token_facts_follow_qwens_merged_grids():
    model = qwen_model()
    inputs = qwen_inputs("image")  # 64 x 96 pixels -> 8 x 12 patches -> 4 x 6 visual tokens
    facts = tower_facts(model, inputs)
    visual = visual_mask(model.config, inputs["input_ids"])[0]
    assert tuple(inputs["image_grid_thw"][0].tolist()) == (1, 8, 12) and int(visual.sum()) == 24
    rows = (torch.arange(4).float() + 0.5) / 4
    cols = (torch.arange(6).float() + 0.5) / 6
    assert torch.equal(facts.view[0, visual], torch.zeros(24, dtype=torch.long))
    assert torch.allclose(facts.row[0, visual], rows[:, None].expand(4, 6).reshape(-1))
    assert torch.allclose(facts.col[0, visual], cols[None, :].expand(4, 6).reshape(-1))
    assert (facts.view[0, ~visual] == -1).all()
    # each image's patches share its attention: the tokens' scores (means of four patches) sum to 1/4
    torch.testing.assert_close(facts.score[0, visual].sum(), torch.tensor(0.25), atol=1e-5, rtol=0)

    video = qwen_inputs("video")  # 8 frames of 32 x 32 -> 4 pairs of frames, 2 x 2 tokens each
    facts = tower_facts(model, video)
    visual = visual_mask(model.config, video["input_ids"])[0]
    assert facts.view[0, visual].tolist() == [VIDEO_VIEWS + t for t in range(4) for _ in range(4)]
    for t in range(4):  # every pair of frames attends within the video: scores over the video sum to 1/4
        assert torch.allclose(facts.row[0, visual][4 * t : 4 * t + 4], torch.tensor([0.25, 0.25, 0.75, 0.75]))


def test_the_towers_order_is_put_back_as_the_model_puts_it_back():
    """The merger's output, put in the LLM's order by the model, equals the merger applied to the tower's last
    hidden states reordered the way the adapter reorders the facts (Qwen2.5-VL: argsort of the window index;
    Qwen3-VL: no windows, no reordering)."""
    model = qwen_model()
    inputs = qwen_inputs("batch")
    visual = model.model.visual
    with torch.no_grad():
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        order = family_of(model).tower_to_llm_order(model.config.vision_config, inputs["image_grid_thw"], "cpu")
        windows = not torch.equal(order, torch.arange(len(order)))
        assert windows == (current_family() == "qwen2_5_vl")  # the permutation is not trivial where there are windows
        again = visual.merger(out.last_hidden_state)[order]
    torch.testing.assert_close(again, out.pooler_output, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["image", "video", "batch"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", METHODS)
def test_budgets_count_qwens_merged_tokens(name, ratio, kind):
    inputs = qwen_inputs(kind)
    pruner = make(name, ratio)
    record, logits = run(qwen_model(), pruner, inputs)
    assert torch.isfinite(logits).all()
    n_visual = visual_mask(qwen_model().config, inputs["input_ids"]).sum(1).tolist()
    for b, n in enumerate(n_visual):
        if name == "vitcop":
            S, D = VITCOP_LAYERS
            k1, k2, k3 = vitcop_counts(ratio, pruner.solved_vision_keep, n, S, D, QWEN_LAYERS)
            want = [k1] * S + [k2] * (D - S) + [k3] * (QWEN_LAYERS - D)
        else:
            want = [floor_budget(n, ratio)] * QWEN_LAYERS
        assert record.layer_visual_tokens[:, b].tolist() == want


@pytest.mark.parametrize("name", METHODS)
def test_padded_batch_matches_samples_alone(name):
    model = qwen_model("session", torch.float64)
    batch = qwen_inputs("batch", dtype=torch.float64)
    record, batch_logits = run(model, make(name, 0.5), batch)
    length = batch["input_ids"].shape[1]
    for b, single in enumerate(qwen_batch_samples(torch.float64)):
        n = single["input_ids"].shape[1]
        alone, logits = run(model, make(name, 0.5), single)
        assert torch.equal(alone.layer_visual_tokens[:, 0], record.layer_visual_tokens[:, b])
        positions = record.kept.index[b][record.kept.valid[b]] - (length - n)
        assert torch.equal(positions, alone.kept.index[0][alone.kept.valid[0]])
        torch.testing.assert_close(batch_logits[b, -1], logits[0, -1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["batch", "video"])
@pytest.mark.parametrize("name", METHODS)
def test_generate_keeps_what_a_forward_keeps(name, kind):
    model = qwen_model()
    inputs = qwen_inputs(kind)
    forward, logits = run(model, make(name, 0.25), inputs)
    with torch.no_grad(), PruningSession(model, make(name, 0.25)) as session:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    prefill = session.record
    assert torch.equal(prefill.layer_visual_tokens, forward.layer_visual_tokens)
    for stage, other in zip(prefill.stages[1:], forward.stages[1:], strict=True):
        assert torch.equal(
            stage.compaction.index[stage.compaction.valid], other.compaction.index[other.compaction.valid]
        )
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("name", METHODS)
def test_exit_removes_every_hook(name):
    model = qwen_model()
    before = hook_counts(model)
    with torch.no_grad(), PruningSession(model, make(name, 0.5)):
        model(**qwen_inputs("video"))
    assert hook_counts(model) == before


@pytest.mark.parametrize("size", [(64, 96), (40, 40), (100, 37), (200, 300)])
def test_heatmap_panel_covers_every_visual_token(size):
    from PIL import Image

    from covipal.evaluation.heatmap import kept_token_heatmap
    from covipal.models.families import family_of

    model, processor = qwen_model(), qwen_processor()
    height, width = size
    image = Image.new("RGB", (width, height), (200, 30, 30))
    inputs = processor(images=[image], text=qwen_prompt(processor, "what colour?", images=1), return_tensors="pt")
    n_visual = int(visual_mask(model.config, inputs["input_ids"]).sum())
    ((start, rows, columns, stride),) = family_of(model).image_token_panels(model, processor, height, width)
    grid = inputs["image_grid_thw"][0].tolist()
    assert start == 0 and rows * stride == n_visual and [rows * 2, columns * 2] == grid[1:]
    kept = np.zeros(n_visual, dtype=bool)
    kept[: n_visual // 2] = True  # the top half kept
    sheet = np.asarray(kept_token_heatmap(model, processor, image, kept))
    column = sheet[:, sheet.shape[1] // 2, 0]  # red channel down the middle: kept above, dimmed below
    assert column[1] == 200 and column[-2] == 50
