"""Accuracy on the tiny world's held-out benchmarks, with any pruner (our own exact-match scoring; the
VLMEvalKit path reads the same benchmarks from their TSV files)."""

from __future__ import annotations

from collections import defaultdict

from covipal.data.sample import Sample
from covipal.evaluation.scoring import is_correct
from covipal.inference import generate_answers
from covipal.models.loading import LoadedModel
from covipal.pruning.context import Pruner
from covipal.tiny_world.export import benchmark_samples
from covipal.tiny_world.layout import layout_of


def accuracy(loaded: LoadedModel, pruner: Pruner, samples: list[Sample], batch_size: int = 32, progress=False):
    """Overall accuracy, accuracy per question type, and the achieved average reserve ratio."""
    answers = generate_answers(loaded, pruner, samples, max_new_tokens=3, batch_size=batch_size, progress=progress)
    by_type = defaultdict(list)
    for sample, answer in zip(samples, answers):
        by_type[sample.meta["type"]].append(is_correct(sample, answer.text))
    correct = [c for values in by_type.values() for c in values]
    return {
        "accuracy": sum(correct) / len(correct),
        "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "reserve_ratio": sum(a.reserve_ratio for a in answers) / len(answers),
        "questions": len(samples),
    }


def benchmark_accuracy(loaded: LoadedModel, pruner: Pruner, name: str, count: int, **kwargs) -> dict:
    """`accuracy` on the first `count` questions of tiny-world benchmark `name` (ground truth in the model's
    layout, for the oracle)."""
    layout = layout_of(loaded.model, loaded.processor)
    return accuracy(loaded, pruner, benchmark_samples(name, count, layout=layout), **kwargs)
