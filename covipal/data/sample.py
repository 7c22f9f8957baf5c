"""The unit every reader and generator yields: a question about images or a video, with its reference answer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One question about zero or more images or one video (frames as a [F, H, W, 3] uint8 array)."""

    question: str
    images: list = field(default_factory=list)
    video: np.ndarray | None = None
    answer: str | None = None
    relevance: np.ndarray | None = None  # bool over the sample's visual tokens: those the question is about
    meta: dict = field(default_factory=dict)  # e.g. question type, answer format

    @property
    def kind(self) -> str:
        return "video" if self.video is not None else ("image" if self.images else "text")
