"""Exact-match scoring of generated answers: option letters for multiple choice, normalised words otherwise."""

from __future__ import annotations

import re

from covipal.data.sample import Sample


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def is_correct(sample: Sample, prediction: str) -> bool:
    if sample.meta.get("format") == "mcq":
        letters = re.findall(r"\b([A-D])\b", prediction.upper())
        return bool(letters) and letters[0] == sample.answer
    return normalise(prediction) == normalise(sample.answer)
