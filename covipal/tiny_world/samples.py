"""Samples of the tiny world (questions with their images or videos), for pretraining, training and benchmarks."""

from __future__ import annotations

import numpy as np

from covipal.data.sample import Sample
from covipal.tiny_world.synthetic import (
    IMAGE_QUESTION_TYPES,
    ONEVISION,
    VIDEO_QUESTION_TYPES,
    Question,
    TokenLayout,
    image_token_anchors,
    image_token_relevance,
    random_image_question,
    random_scene,
    random_video_question,
    random_video_scene,
    video_token_relevance,
)


def _sample(question: Question, fmt: str, relevance: np.ndarray, **visual) -> Sample:
    prompt, answer = question.mcq() if fmt == "mcq" else question.short()
    meta = {"type": question.kind, "format": fmt, "short_answer": question.answer, "options": question.options}
    return Sample(prompt, answer=answer, relevance=relevance, meta=meta, **visual)


def _add_turns(sample: Sample, rng, ask, relevance, turns: int, mcq_fraction: float, first: Question, anchors=None):
    """Further (prompt, answer) turns about the same scene in `meta["turns"]`, for multi-turn training
    conversations, and every turn's relevance mask, short answer and kind (the first question's included) in
    `meta["turn_relevance"]`, `meta["turn_short_answers"]` and `meta["turn_kinds"]`; with `anchors` (objects ->
    mask), also every turn's one token per object in `meta["turn_anchors"]`."""
    extra, questions = [], [first]
    for _ in range(turns - 1):
        question = ask()
        if question is not None:
            extra.append(question.mcq() if rng.random() < mcq_fraction else question.short())
            questions.append(question)
    sample.meta["turns"] = extra
    sample.meta["turn_relevance"] = [sample.relevance] + [relevance(q.about) for q in questions[1:]]
    sample.meta["turn_short_answers"] = [q.answer for q in questions]
    sample.meta["turn_kinds"] = [q.kind for q in questions]
    if anchors is not None:
        sample.meta["turn_anchors"] = [anchors(q.about) for q in questions]


def image_sample(
    rng: np.random.Generator,
    fmt: str,
    kinds=IMAGE_QUESTION_TYPES,
    min_objects: int = 4,
    max_objects: int = 7,
    turns: int = 1,
    mcq_fraction: float = 0.5,
    layout: TokenLayout = ONEVISION,
) -> Sample:
    """One image question (`turns` > 1 adds further questions about the same scene in `meta["turns"]`), its ground
    truth over the visual tokens of `layout`."""
    question = None
    while question is None:  # a scene that supports none of `kinds` is drawn again
        scene = random_scene(rng, min_objects, max_objects)
        question = random_image_question(rng, scene, kinds)
    relevance = lambda about: image_token_relevance(scene, about, layout)  # noqa: E731
    anchors = lambda about: image_token_anchors(scene, about, layout)  # noqa: E731
    sample = _sample(question, fmt, relevance(question.about), images=[scene.render()])
    sample.meta["scene_relevance"] = relevance(list(range(len(scene.objects))))
    ask = lambda: random_image_question(rng, scene, kinds)  # noqa: E731
    _add_turns(sample, rng, ask, relevance, turns, mcq_fraction, question, anchors)
    return sample


def video_sample(
    rng: np.random.Generator,
    fmt: str,
    kinds=VIDEO_QUESTION_TYPES,
    turns: int = 1,
    mcq_fraction: float = 0.5,
    layout: TokenLayout = ONEVISION,
) -> Sample:
    """One video question (and further turns, as `image_sample`), its ground truth over `layout`'s tokens."""
    question = None
    while question is None:
        scene = random_video_scene(rng)
        question = random_video_question(rng, scene, kinds)
    relevance = lambda about: video_token_relevance(scene, about, layout)  # noqa: E731
    sample = _sample(question, fmt, relevance(question.about), video=scene.render())
    sample.meta["scene_relevance"] = relevance(list(range(len(scene.objects))))
    ask = lambda: random_video_question(rng, scene, kinds)  # noqa: E731
    _add_turns(sample, rng, ask, relevance, turns, mcq_fraction, question)
    return sample


def sample_stream(
    seed: int,
    video_fraction: float = 0.25,
    mcq_fraction: float = 0.5,
    objects=(4, 7),
    turns: int = 1,
    kinds=None,
    layout: TokenLayout = ONEVISION,
):
    """An endless seeded stream of training samples (conversations of `turns` questions about one scene), their
    ground truth over `layout`'s tokens."""
    rng = np.random.default_rng(seed)
    while True:
        fmt = "mcq" if rng.random() < mcq_fraction else "short"
        if rng.random() < video_fraction:
            yield video_sample(rng, fmt, turns=turns, mcq_fraction=mcq_fraction, layout=layout)
        else:
            image_kinds = kinds or IMAGE_QUESTION_TYPES
            yield image_sample(rng, fmt, image_kinds, *objects, turns=turns, mcq_fraction=mcq_fraction, layout=layout)
