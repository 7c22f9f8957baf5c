"""The sanity baselines: `random` keeps exactly floor(r · n_v) seeded tokens; `oracle` keeps the tokens the
question is about first; the training-only focus pruner keeps every relevant token plus a random share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image_batch
from pruning_helpers import visual_mask

from covipal.errors import CovipalError
from covipal.pruning.budget import visual_budget
from covipal.pruning.random import RandomPruner
from covipal.pruning.session import PruningSession
from covipal.tiny_world.oracle import FocusPruner, OraclePruner


def kept_visual(model, inputs, pruner, relevance=None):
    with torch.no_grad(), PruningSession(model, pruner) as session:
        if relevance is not None:
            session.extras = {"relevance": relevance}
        model(**inputs)
    record = session.record
    keep = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    keep.scatter_(1, record.kept.index, record.kept.valid)
    return keep & visual_mask(model, inputs["input_ids"]), record


def relevance_for(model, inputs, seed=0):
    visual = visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    rng = np.random.default_rng(seed)
    return [rng.random(int(n)) < 0.1 for n in visual.sum(1)]


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_random_pruner_budget_and_determinism(sdpa_model, processor, ratio):
    inputs = make_image_batch(processor)
    keep, record = kept_visual(sdpa_model, inputs, RandomPruner(ratio, seed=3))
    assert torch.equal(keep.sum(1), visual_budget(record.n_visual, ratio))
    assert torch.equal(record.layer_visual_tokens, visual_budget(record.n_visual, ratio).expand(12, -1))
    again, _ = kept_visual(sdpa_model, inputs, RandomPruner(ratio, seed=3))
    other, _ = kept_visual(sdpa_model, inputs, RandomPruner(ratio, seed=4))
    assert torch.equal(keep, again) and not torch.equal(keep, other)


def test_oracle_keeps_relevant_tokens_first_within_the_budget(sdpa_model, processor):
    inputs = make_image_batch(processor)
    relevance = relevance_for(sdpa_model, inputs)
    keep, record = kept_visual(sdpa_model, inputs, OraclePruner(0.25), relevance)
    visual = visual_mask(sdpa_model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    for row, marks in enumerate(relevance):
        positions = visual[row].nonzero().squeeze(1)
        assert keep[row, positions[torch.as_tensor(marks)]].all()
    assert torch.equal(keep.sum(1), visual_budget(record.n_visual, 0.25))
    with pytest.raises(CovipalError, match="relevance"):
        kept_visual(sdpa_model, inputs, OraclePruner(0.25))


def test_focus_pruner_keeps_every_relevant_token_plus_a_share(sdpa_model, processor):
    inputs = make_image_batch(processor)
    relevance = [np.arange(len(marks)) < 20 for marks in relevance_for(sdpa_model, inputs)]
    keep, record = kept_visual(sdpa_model, inputs, FocusPruner(0.05, seed=0), relevance)
    visual = visual_mask(sdpa_model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    for row, marks in enumerate(relevance):
        positions = visual[row].nonzero().squeeze(1)
        assert keep[row, positions[torch.as_tensor(marks)]].all()
        others = int(keep[row, positions[~torch.as_tensor(marks)]].sum())
        assert 0 <= others <= max(3, 0.2 * int((~torch.as_tensor(marks)).sum()))


def test_focus_pruner_takes_one_keep_ratio_per_sample(sdpa_model, processor):
    inputs = make_image_batch(processor)
    relevance = [np.arange(len(marks)) < 5 for marks in relevance_for(sdpa_model, inputs)]
    keep, _ = kept_visual(sdpa_model, inputs, FocusPruner([0.05, 1.0], seed=0), relevance)
    visual = visual_mask(sdpa_model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    assert keep[1, visual[1]].all()  # ratio 1: every visual token
    first = visual[0].nonzero().squeeze(1)
    assert keep[0, first[:5]].all() and int(keep[0, first[5:]].sum()) <= max(3, 0.2 * (len(first) - 5))
