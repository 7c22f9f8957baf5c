"""Budgets and batching: per-layer visual counts follow the configuration, a padded batch behaves like its samples
alone, inputs without visual tokens pass through, and bad settings fail with a one-line CovipalError."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import prompt, random_image
from pruning_helpers import (
    NUM_LAYERS,
    PPM,
    batch_samples,
    covipal_hooks,
    exact,
    float64_model,
    floor_budget,
    generate_position_ids,
    get_inputs,
    make_pruner,
    pristine,
    stock_logits,
    to_float64,
    visual_mask,
)

from covipal.errors import CovipalError
from covipal.models.ppm import PPMClassifier, PPMConfig
from covipal.pruning.budget import visual_budget
from covipal.pruning.covipal import CoViPALPruner
from covipal.pruning.fastv import FastVPruner, fastv_keep_fraction
from covipal.pruning.session import PruningSession

MARK = "_covipal_pruning_session"


def n_visual_of(model, inputs) -> list[int]:
    return (visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()).sum(1).tolist()


def expected_counts(name: str, ratio: float, n_visual: int, K: int = 2) -> list[int]:
    """Visual tokens each of the 12 layers takes in, from the configuration alone (exact decimal arithmetic)."""
    if name == "none":
        return [n_visual] * NUM_LAYERS
    if name == "covipal":
        return [floor_budget(n_visual, exact(ratio))] * NUM_LAYERS
    fraction = (exact(ratio) * NUM_LAYERS - K) / (NUM_LAYERS - K)
    return [n_visual] * K + [floor_budget(n_visual, fraction)] * (NUM_LAYERS - K)


BUDGET_CASES = [
    ("none", 1.0, {}),
    ("covipal", 0.5, {}),
    ("covipal", 0.25, {}),
    ("covipal", 0.1, {}),
    ("covipal", 0.01, {}),  # floor(0.01 · n_v) = 0 for these inputs: at least one visual token stays
    ("fastv", 0.5, {}),
    ("fastv", 0.3, {}),
    ("fastv", 0.5, {"K": 3}),
]


@pytest.mark.parametrize("kind", ["batch", "video", "image"])
@pytest.mark.parametrize("name, ratio, kw", BUDGET_CASES)
def test_layer_counts_follow_config(sdpa_model, processor, name, ratio, kw, kind):
    inputs = get_inputs(processor, kind)
    pruner = make_pruner(name, ratio, **kw)
    with torch.no_grad(), PruningSession(sdpa_model, pruner) as session:
        sdpa_model(**inputs)
    record = session.record
    n_visual = n_visual_of(sdpa_model, inputs)
    assert record.n_visual.tolist() == n_visual
    K = kw.get("K", 2)
    if name == "fastv":
        assert pruner.keep_fraction == pytest.approx((ratio * NUM_LAYERS - K) / (NUM_LAYERS - K), abs=1e-12)
    expected = torch.tensor([expected_counts(name, ratio, n, K) for n in n_visual]).T  # [L, B]
    assert torch.equal(record.layer_visual_tokens, expected)
    mean = expected.double().mean(0) / torch.tensor(n_visual, dtype=torch.float64)
    torch.testing.assert_close(record.reserve_ratio.double(), mean, atol=1e-12, rtol=0)
    if name == "covipal" and ratio == 0.01:
        assert expected.min() == 1


def test_visual_budget_edge_cases():
    assert visual_budget(torch.tensor([100]), 0.29).tolist() == [29]  # 0.29 · 100 = 28.999… in binary
    assert visual_budget(torch.tensor([0]), 0.5).tolist() == [0]
    assert visual_budget(torch.tensor([10]), 1e-6).tolist() == [1]
    assert visual_budget(torch.tensor([0, 100, 10, 7]), 0.29).tolist() == [0, 29, 2, 2]
    assert visual_budget(torch.tensor([3, 0]), 1e-9).tolist() == [1, 0]
    assert visual_budget(torch.tensor([120]), 1.0).tolist() == [120]
    for n in range(0, 200):
        for ratio in (0.1, 0.25, 0.29, 0.3, 0.7):
            want = 0 if n == 0 else max(1, math.floor(exact(ratio) * n))
            assert visual_budget(torch.tensor([n]), ratio).tolist() == [want], (n, ratio)


@pytest.mark.parametrize("name, ratio", [("covipal", 0.5), ("covipal", 0.25), ("fastv", 0.5), ("fastv", 0.3)])
def test_padded_batch_matches_samples_alone(tiny_dir, processor, name, ratio):
    """float64 (see pruning_helpers.float64_model), with the position ids generate gives a left-padded batch."""
    model = float64_model(tiny_dir, "sdpa", "session")
    batch = to_float64(get_inputs(processor, "batch"))
    singles = [to_float64(sample) for sample in batch_samples(processor)]
    length = batch["input_ids"].shape[1]
    with torch.no_grad(), PruningSession(model, make_pruner(name, ratio)) as session:
        batch_logits = model(**batch, position_ids=generate_position_ids(batch["attention_mask"])).logits
        batch_kept = session.record.kept
        batch_counts = session.record.layer_visual_tokens
        # kept positions do not depend on the position ids either
        model(**batch)
        assert torch.equal(session.record.kept.index, batch_kept.index)
        assert torch.equal(session.record.kept.valid, batch_kept.valid)
        for b, single in enumerate(singles):
            n = single["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][b, length - n :], single["input_ids"][0])
            logits = model(**single).logits
            kept = session.record.kept
            assert torch.equal(session.record.layer_visual_tokens[:, 0], batch_counts[:, b])
            positions = batch_kept.index[b][batch_kept.valid[b]] - (length - n)
            assert torch.equal(positions, kept.index[0][kept.valid[0]])
            torch.testing.assert_close(
                batch_logits[b][batch_kept.valid[b]], logits[0][kept.valid[0]], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("name, ratio", [("covipal", 0.25), ("fastv", 0.5)])
def test_text_only_row_in_a_batch(tiny_dir, processor, name, ratio):
    """A text-only sample padded into a batch with an image sample: its row is untouched (float64)."""
    texts = [
        prompt(processor, "how many objects are there?"),
        prompt(processor, "what colour is the circle?", images=1),
    ]
    batch = to_float64(processor(text=texts, images=[random_image(0, 64, 96)], return_tensors="pt", padding=True))
    alone = to_float64(processor(text=[texts[0]], return_tensors="pt"))
    model = float64_model(tiny_dir, "sdpa", "session")
    with torch.no_grad(), PruningSession(model, make_pruner(name, ratio)) as session:
        logits = model(**batch, position_ids=generate_position_ids(batch["attention_mask"])).logits
    record = session.record
    n_image = n_visual_of(model, batch)[1]
    assert record.n_visual.tolist() == [0, n_image]
    assert record.layer_visual_tokens[:, 0].tolist() == [0] * NUM_LAYERS
    assert record.layer_visual_tokens[-1, 1] < n_image
    assert record.reserve_ratio[0].item() == 1.0
    kept = record.kept
    n = alone["input_ids"].shape[1]
    length = batch["input_ids"].shape[1]
    assert kept.index[0][kept.valid[0]].tolist() == list(range(length - n, length))
    expected = stock_logits(float64_model(tiny_dir, "sdpa", "reference"), alone)[0]
    torch.testing.assert_close(logits[0][kept.valid[0]], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, ratio", [("none", 1.0), ("covipal", 0.25), ("fastv", 0.5)])
def test_text_only_passes_through(model, tiny_dir, processor, name, ratio):
    inputs = get_inputs(processor, "text")
    expected = stock_logits(pristine(tiny_dir, model.config._attn_implementation), inputs)
    with torch.no_grad(), PruningSession(model, make_pruner(name, ratio)) as session:
        logits = model(**inputs).logits
    assert torch.equal(logits, expected)
    assert session.record.kept is None
    assert session.record.n_visual.tolist() == [0]
    assert session.record.layer_visual_tokens.tolist() == [[0]] * NUM_LAYERS
    assert session.record.reserve_ratio.tolist() == [1.0]


def assert_one_line(error: CovipalError, *needles: str):
    message = str(error)
    assert "\n" not in message.strip()
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: CoViPALPruner(1.5, classifier="random", ppm=PPM), "1.5"),
        (lambda: CoViPALPruner(0, classifier="random", ppm=PPM), "=0"),
        (lambda: CoViPALPruner(-0.25, classifier="random", ppm=PPM), "-0.25"),
        (lambda: FastVPruner(-0.1), "-0.1"),
        (lambda: FastVPruner(1.01), "1.01"),
        (lambda: FastVPruner(0.5, K=0), "K=0"),
        (lambda: FastVPruner(0.5, R=1.0), "R=1.0"),
    ],
)
def test_bad_ratio_raises_one_line(make, bad):
    with pytest.raises(CovipalError) as info:
        make()
    assert_one_line(info.value, bad)


def test_covipal_needs_a_classifier():
    with pytest.raises(CovipalError) as info:
        CoViPALPruner(0.25)
    assert_one_line(info.value, "classifier=random")


def test_fastv_infeasible_ratio_names_a_feasible_setting(sdpa_model, processor):
    model = sdpa_model
    with PruningSession(model, FastVPruner(0.25, K=2)) as session:  # (0.25·12 − 2)/10 = 0.1 > 0: fine
        pass
    assert session.pruner.keep_fraction == pytest.approx(0.1)
    pruner = FastVPruner(0.1, K=2)  # construction is fine, the model's depth decides
    with pytest.raises(CovipalError) as info:
        with PruningSession(model, pruner):
            pass  # pragma: no cover
    assert_one_line(info.value, "0.1")
    assert MARK not in vars(model) and covipal_hooks(model) == []  # a refused entry leaves nothing behind
    # the message names a reserve ratio that works with K=2 on these 12 layers; follow it
    match = re.search(r"reserve_ratio\s*>=?\s*([0-9.]+)", str(info.value))
    assert match, str(info.value)
    suggested = float(match.group(1))
    follow = FastVPruner(suggested, K=2)
    inputs = get_inputs(processor, "image")
    with torch.no_grad(), PruningSession(model, follow) as session:
        model(**inputs)
    assert follow.keep_fraction > 0
    assert session.record.layer_visual_tokens[-1, 0] >= 1


def test_fastv_at_r_equal_K_over_L_keeps_one_visual_token_after_K(sdpa_model, processor):
    """r = K/L (the tiny model's K=1 of 4 layers at 0.25) leaves fraction 0 after K: every later layer takes in
    the single visual token every budget keeps; a smaller r is refused."""
    assert fastv_keep_fraction(0.25, 4, 1) == 0.0 and fastv_keep_fraction(0.5, 4, 1) == pytest.approx(1 / 3)
    with pytest.raises(CovipalError, match=r"reserve_ratio>=0.25"):
        fastv_keep_fraction(0.24, 4, 1)
    ratio = 3 / NUM_LAYERS
    pruner = FastVPruner(ratio, K=3)
    inputs = get_inputs(processor, "image")
    with torch.no_grad(), PruningSession(sdpa_model, pruner) as session:
        sdpa_model(**inputs)
    assert pruner.keep_fraction == 0.0
    n_visual = n_visual_of(sdpa_model, inputs)[0]
    assert session.record.layer_visual_tokens[:, 0].tolist() == [n_visual] * 3 + [1] * (NUM_LAYERS - 3)


def test_fastv_K_beyond_depth_raises(sdpa_model):
    with pytest.raises(CovipalError) as info:
        with PruningSession(sdpa_model, FastVPruner(0.5, K=NUM_LAYERS)):
            pass  # pragma: no cover
    assert_one_line(info.value, f"K={NUM_LAYERS}")
    assert MARK not in vars(sdpa_model)


def test_covipal_checkpoint_of_wrong_width(sdpa_model, tmp_path):
    ppm = PPMClassifier(
        PPMConfig(input_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    )
    ppm.save_pretrained(tmp_path / "ppm32")
    pruner = CoViPALPruner(0.25, classifier=str(tmp_path / "ppm32"))
    with pytest.raises(CovipalError) as info:
        with PruningSession(sdpa_model, pruner):
            pass  # pragma: no cover
    width = sdpa_model.config.text_config.hidden_size
    assert width != 32
    assert_one_line(info.value)
    assert re.search(r"\b32\b", str(info.value)) and re.search(rf"\b{width}\b", str(info.value)), str(info.value)
    assert MARK not in vars(sdpa_model) and covipal_hooks(sdpa_model) == []


def test_covipal_missing_checkpoint(sdpa_model, tmp_path):
    pruner = CoViPALPruner(0.25, classifier=str(tmp_path / "nowhere"))
    with pytest.raises(CovipalError) as info:
        with PruningSession(sdpa_model, pruner):
            pass  # pragma: no cover
    assert_one_line(info.value, "nowhere")
