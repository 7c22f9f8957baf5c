"""A training mixture: the sources named in the data config, concatenated (each already a seeded subset)."""

from __future__ import annotations

from torch.utils.data import ConcatDataset

from covipal.errors import CovipalError


def mixture(sources: dict | list) -> ConcatDataset:
    """`sources`: built data sets (a dict name → data set, so one can be dropped with `~data.sources.NAME`)."""
    parts = list(sources.values()) if isinstance(sources, dict) else list(sources)
    parts = [p for p in parts if p is not None]
    if not parts:
        raise CovipalError("the data config has no sources")
    return ConcatDataset(parts)
