"""Budget solvers: the setting of a layer-wise method that makes its average reserve ratio (visual tokens each
LLM layer takes in, averaged over all L layers, over n_v) equal the requested `r` (BASELINES.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from covipal.errors import CovipalError


def staged_average(layers: Sequence[int], fractions: Sequence[float], num_layers: int) -> float:
    """Average kept fraction when layers [0, layers[0]) keep everything and layers [layers[i], layers[i+1]) keep
    fractions[i] (the last stage runs to the end)."""
    bounds = [*layers, num_layers]
    total = layers[0] + sum((bounds[i + 1] - bounds[i]) * fractions[i] for i in range(len(layers)))
    return total / num_layers


def bisect(f: Callable[[float], float], target: float, low: float, high: float, steps: int = 200) -> float:
    """x in [low, high] with f(x) = target, for f increasing."""
    for _ in range(steps):
        middle = (low + high) / 2
        if f(middle) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def check_layers(layers: Sequence[int], num_layers: int, name: str = "pruner.layers") -> list[int]:
    layers = [int(layer) for layer in layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
        raise CovipalError(
            f"{name}={layers} must be increasing layer indices within 0..{num_layers - 1} (the LLM's layers)"
        )
    return layers


def scaled_layers(reference: Sequence[int], reference_depth: int, num_layers: int) -> list[int]:
    """A layer list given for one depth, scaled to another (kept increasing)."""
    scaled = []
    for layer in reference:
        value = int(layer * num_layers / reference_depth)
        scaled.append(max(value, scaled[-1] + 1 if scaled else 0))
    return scaled


def pdrop_lambda(reserve_ratio: float, layers: Sequence[int], num_layers: int) -> float:
    """PyramidDrop's λ: stage i (after layers[i]) keeps λ^(i+1) of n_v, so the average is
    [l1 + Σ (l_{i+1} − l_i) λ^i + (L − l_m) λ^m] / L. Fails, naming a feasible layer list, when r ≤ l1 / L."""

    def average(lam: float) -> float:
        return staged_average(layers, [lam ** (i + 1) for i in range(len(layers))], num_layers)

    if reserve_ratio >= 1.0:
        return 1.0
    if reserve_ratio <= average(0.0) + 1e-9:
        first = max(0, int(reserve_ratio * num_layers - 1e-9) - 1)
        feasible = [first, *[layer for layer in scaled_layers([2, 8, 16], 28, num_layers) if layer > first]]
        raise CovipalError(
            f"pdrop with pruner.layers={list(layers)} on {num_layers} layers cannot average "
            f"pruner.reserve_ratio={reserve_ratio}: the first {layers[0]} layers alone keep more; "
            f"use pruner.layers={feasible[:3]} (a first layer below r·L = {reserve_ratio * num_layers:g})"
        )
    return bisect(average, reserve_ratio, 0.0, 1.0)
