"""Paired bootstrap intervals for differences in accuracy between two methods answering the same questions.

Each benchmark is a stratum: a replicate resamples every benchmark's questions with replacement (the same draw
for both methods, so their pairing is kept) and averages the per-benchmark differences, so the interval of a
mean over benchmarks weighs every benchmark equally, as the mean itself does. Scores per question are in [0, 1]
(a hit, or the mean hit over several seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Interval:
    difference: float  # the observed mean difference (a − b), in the scores' unit
    low: float
    high: float

    def scaled(self, factor: float) -> Interval:
        return Interval(self.difference * factor, self.low * factor, self.high * factor)


def paired_bootstrap(
    pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval of mean over strata of mean(a − b); `pairs`: per stratum, scores of the same questions under a and b."""
    if not pairs or any(len(a) != len(b) or len(a) == 0 for a, b in pairs):
        raise ValueError("every stratum needs the same, non-zero number of questions under both methods")
    generator = np.random.default_rng(seed)
    differences = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) for a, b in pairs]
    replicates = np.zeros(resamples)
    for stratum in differences:
        draws = generator.integers(0, len(stratum), size=(resamples, len(stratum)))
        replicates += stratum[draws].mean(1)
    replicates /= len(differences)
    tail = (1 - level) / 2
    observed = float(np.mean([stratum.mean() for stratum in differences]))
    return Interval(observed, float(np.quantile(replicates, tail)), float(np.quantile(replicates, 1 - tail)))
