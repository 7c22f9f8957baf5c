"""Measuring selection quality against ground truth: the share of a question's relevant visual tokens each
layer keeps, and paired bootstrap intervals for differences in accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

from covipal.data.sample import Sample
from covipal.evaluation.intervals import paired_bootstrap
from covipal.inference import generate_answers
from covipal.models.loading import LoadedModel
from covipal.pruning.fastv import FastVPruner
from covipal.pruning.none import NoPruner
from covipal.pruning.random import RandomPruner
from covipal.tiny_world.oracle import OraclePruner


@pytest.fixture(scope="module")
def loaded(sdpa_model, processor):
    return LoadedModel(model=sdpa_model, processor=processor, name="test")


def samples_with_relevance(loaded, count: int = 3, relevant: int = 6) -> list[Sample]:
    """Image questions whose first `relevant` visual tokens after the 10th are marked relevant."""
    processor, image_token = loaded.processor, loaded.model.config.image_token_id
    samples = []
    for seed in range(count):
        image = random_image(seed, 64, 96)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}],
            add_generation_prompt=True,
        )
        n_visual = int((processor(text=prompt, images=image, return_tensors="pt")["input_ids"] == image_token).sum())
        mask = np.zeros(n_visual, dtype=bool)
        mask[10 + seed : 10 + seed + relevant] = True
        samples.append(Sample("what colour?", images=[image], relevance=mask))
    return samples


def kept_shares(loaded, pruner, samples):
    answers = generate_answers(loaded, pruner, samples, max_new_tokens=1, progress=False)
    return [answer.relevant_kept for answer in answers]


def test_none_and_a_covering_oracle_keep_every_relevant_token(loaded):
    samples = samples_with_relevance(loaded)
    layers = len(loaded.model.model.language_model.layers)
    assert kept_shares(loaded, NoPruner(), samples) == [[1.0] * layers] * len(samples)
    assert kept_shares(loaded, OraclePruner(0.25), samples) == [[1.0] * layers] * len(samples)  # budget ≥ 6 tokens
    unmarked = Sample("what colour?", images=[random_image(0, 64, 96)])
    assert kept_shares(loaded, NoPruner(), [unmarked]) == [None]


def test_random_and_in_llm_pruning_lose_relevant_tokens_where_they_drop(loaded):
    samples = samples_with_relevance(loaded, relevant=40)
    random = kept_shares(loaded, RandomPruner(0.1, seed=0), samples)
    assert all(len(set(kept)) == 1 and kept[0] < 0.5 for kept in random)  # dropped before layer 0: one value
    fastv = kept_shares(loaded, FastVPruner(0.25, K=2), samples)
    assert all(kept[:2] == [1.0, 1.0] and kept[2] < 1.0 and kept[2] == kept[-1] for kept in fastv)


def test_bootstrap_interval_is_deterministic_and_covers_a_known_difference():
    generator = np.random.default_rng(0)
    pairs = []
    for _ in range(3):  # three benchmarks, method a right 10 points more often than b
        b = (generator.random(2000) < 0.5).astype(float)
        a = np.where(generator.random(2000) < 0.2, 1.0, b)  # flips 20% of answers to right: +~10 points
        pairs.append((a, b))
    first = paired_bootstrap(pairs, seed=7)
    assert first == paired_bootstrap(pairs, seed=7)
    assert first != paired_bootstrap(pairs, seed=8)
    expected = np.mean([(a - b).mean() for a, b in pairs])
    assert first.difference == pytest.approx(expected)
    assert first.low < 0.1 < first.high and first.high - first.low < 0.03
    same = paired_bootstrap([(b, b) for _, b in pairs], seed=0)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same, non-zero number"):
        paired_bootstrap([(np.ones(3), np.ones(2))])


def test_bootstrap_intervals_cover_the_truth_at_their_level():
    """Over 200 synthetic experiments with a true difference of 5 points, a 90% interval misses it about 10% of
    the time."""
    generator = np.random.default_rng(1)
    misses = 0
    for trial in range(200):
        b = (generator.random(300) < 0.6).astype(float)
        a = (generator.random(300) < 0.65).astype(float)
        interval = paired_bootstrap([(a, b)], resamples=400, level=0.9, seed=trial)
        misses += not interval.low <= 0.05 <= interval.high
    assert 8 <= misses <= 35


def test_label_quality_scores_an_exact_ranking_perfectly(loaded):
    """ranking_quality on one batch: a 'PPM' that scores exactly the relevant tokens recalls them all; keeping the
    first tokens is perfectly anti-correlated with position and lies in the base tile."""
    from covipal.data.conversation import TrainingCollator, from_sample, turn_token_ids
    from covipal.tiny_world.label_quality import ranking_quality
    from covipal.tiny_world.oracle import relevance_positions
    from covipal.training.guidance import GuidanceProbe

    samples = samples_with_relevance(loaded, count=2, relevant=5)
    batch = TrainingCollator(loaded.processor, None, labels=False, prompt_only=True)([from_sample(s) for s in samples])
    visual = (batch["input_ids"] == loaded.model.config.image_token_id) & batch["attention_mask"].bool()
    exact = relevance_positions(visual, [s.relevance for s in samples]).float()

    class Exact(torch.nn.Module):
        def forward(self, embeds, attention_mask=None):
            return exact

    probe = GuidanceProbe(loaded.model, 1, "question", turn_ids=turn_token_ids(loaded.processor.tokenizer))
    results = ranking_quality(
        {"question": probe}, {"exact": (Exact(), "question")}, [batch], [s.relevance for s in samples], 64, 0.25
    )
    assert results["exact"]["recall"] == 1.0 and results["exact"]["samples"] == 2
    assert 0 <= results["exact"]["label_overlap"] <= 1 and 0 <= results["question"]["recall"] <= 1
    assert (
        results["first tokens"]["spearman_pos"] == pytest.approx(-1.0) and results["first tokens"]["base_tile"] == 1.0
    )
    assert results["random"]["recall"] < 1.0
