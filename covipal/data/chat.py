"""Turning samples into what a vision-language processor takes: chat messages and one batched processor call."""

from __future__ import annotations

from covipal.data.sample import Sample


def user_message(sample: Sample) -> dict:
    """The first user turn: the sample's images or video, then its question."""
    content = [{"type": "image"}] * len(sample.images) + ([{"type": "video"}] if sample.video is not None else [])
    return {"role": "user", "content": [*content, {"type": "text", "text": sample.question}]}


def processor_inputs(processor, texts: list[str], samples: list[Sample]) -> dict:
    """Processor outputs (left-padded tensors) for `texts`, with the samples' images and videos."""
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    if any(s.images for s in samples):
        kwargs["images"] = [s.images for s in samples]
    if any(s.video is not None for s in samples):
        kwargs["videos"] = [s.video for s in samples]
    return dict(processor(**kwargs))
