"""The tiny world: a deterministic generator, files in the layouts real data comes in, and a pretraining loop
that learns."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
from PIL import Image

from covipal.models.architecture import ArchitectureSpec, local_processor
from covipal.tiny_world.export import BENCHMARKS, benchmark_samples, read_video, write_tiny_world
from covipal.tiny_world.samples import image_sample, video_sample
from covipal.tiny_world.synthetic import (
    CELL,
    COLOURS,
    IMAGE_SIZE,
    NUMBERS,
    Scene,
    SceneObject,
    image_question,
    image_token_anchors,
    image_token_relevance,
    random_scene,
)

WORLD_SPEC = dict(image_size=64, patch_size=8, grid_pinpoints=[[64, 64], [64, 128], [128, 64], [128, 128]])


def test_generator_is_deterministic_for_a_seed():
    first = [image_sample(np.random.default_rng(7), "mcq") for _ in range(3)]
    again = [image_sample(np.random.default_rng(7), "mcq") for _ in range(3)]
    for a, b in zip(first, again):
        assert (a.question, a.answer, a.meta["options"], a.meta["turns"]) == (
            b.question, b.answer, b.meta["options"], b.meta["turns"]
        )  # fmt: skip
        assert np.array_equal(a.meta["scene_relevance"], b.meta["scene_relevance"])
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
        assert np.array_equal(a.relevance, b.relevance)
    other = image_sample(np.random.default_rng(8), "mcq")
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(first[0].images[0]))


def test_every_question_has_its_answer_among_the_options_and_types_all_occur():
    rng = np.random.default_rng(0)
    kinds = set()
    for index in range(300):
        sample = image_sample(rng, "mcq") if index % 4 else video_sample(rng, "mcq")
        options = sample.meta["options"]
        assert sample.meta["short_answer"] in options and len(set(options)) == len(options)
        assert sample.answer == "ABCD"[options.index(sample.meta["short_answer"])]
        kinds.add(sample.meta["type"])
    assert kinds == {
        "attribute_at_location", "location_of_attribute", "counting", "existence", "comparison",
        "first_to_appear", "when_appears", "moving_object",
    }  # fmt: skip


def test_relevance_masks_match_the_processors_token_layout():
    processor = local_processor(ArchitectureSpec(**WORLD_SPEC))
    image = image_sample(np.random.default_rng(1), "short")
    video = video_sample(np.random.default_rng(1), "short")
    for sample, token in ((image, "<image>"), (video, "<video>")):
        content = [{"type": "image" if token == "<image>" else "video"}, {"type": "text", "text": "x"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        kwargs = {"images": sample.images} if sample.images else {"videos": [sample.video]}
        ids = processor(text=text, return_tensors="pt", **kwargs)["input_ids"][0]
        assert int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum()) == len(sample.relevance)
        assert 0 < sample.relevance.sum() < len(sample.relevance) / 4


def test_relevant_tokens_are_those_covering_the_object():
    scene = Scene([SceneObject("square", "red", large=True, row=3, col=12)])
    mask = image_token_relevance(scene, [0])
    base, full = 64, 16
    hi_res = [(i - base) // (full + 1) * full + (i - base) % (full + 1) for i in np.flatnonzero(mask) if i >= base]
    assert sorted(hi_res) == [3 * 16 + 12, 3 * 16 + 13, 4 * 16 + 12, 4 * 16 + 13]
    base_cells = [i for i in np.flatnonzero(mask) if i < base]
    assert base_cells == [1 * 8 + 6, 2 * 8 + 6]  # 16-px base cells over pixels x 96..111, y 24..39
    pixels = np.asarray(scene.render())
    x0, y0, x1, y1 = scene.objects[0].box
    assert (pixels[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] == COLOURS["red"]).all()
    assert x1 - x0 == 2 * CELL and IMAGE_SIZE == 128


def test_anchors_are_each_counted_objects_top_left_full_resolution_token():
    scene = Scene([SceneObject("square", "red", True, 3, 12), SceneObject("cross", "red", False, 10, 2)])
    anchors = image_token_anchors(scene, [0, 1])
    base, full = 64, 16
    assert [((i - base) // (full + 1), (i - base) % (full + 1)) for i in np.flatnonzero(anchors)] == [(3, 12), (10, 2)]
    for index in (0, 1):
        alone = image_token_anchors(scene, [index])
        assert alone.sum() == 1 and not (alone & ~image_token_relevance(scene, [index])).any()


def test_counting_counts_the_objects_of_a_colour_and_every_turn_has_its_anchors():
    rng = np.random.default_rng(2)
    for _ in range(40):
        sample = image_sample(rng, "short", kinds=("counting",), turns=3)
        assert sample.meta["turn_kinds"] == ["counting"] * len(sample.meta["turn_anchors"])
        for anchors, relevance in zip(sample.meta["turn_anchors"], sample.meta["turn_relevance"]):
            assert not (anchors & ~relevance).any()
        colour = sample.question.split()[2]
        assert sample.question.startswith(f"how many {colour} objects are there?") and colour in COLOURS
        assert NUMBERS.index(sample.answer) == sample.meta["turn_anchors"][0].sum() >= 1


def test_existence_asks_whether_an_object_of_a_colour_is_there():
    rng = np.random.default_rng(3)
    answers = []
    for _ in range(200):
        scene = random_scene(rng)
        question = image_question(rng, scene, "existence")
        colour = question.question.split()[3]
        assert question.question == f"is there a {colour} object?" and colour in COLOURS
        assert question.about == [i for i, o in enumerate(scene.objects) if o.colour == colour]
        assert question.answer == ("yes" if question.about else "no")
        answers.append(question.answer)
    assert 0.5 < answers.count("yes") / len(answers) < 0.65  # "no" needs a colour the scene lacks


def test_export_writes_every_layout(tmp_path):
    root = write_tiny_world(tmp_path, train_images=4, train_videos=2, benchmark_size=5, progress=False)
    records = json.loads((root / "llava_next" / "tiny_world.json").read_text())
    assert len(records) == 4 and records[0]["conversations"][0]["from"] == "human"
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert Image.open(root / "llava_next" / records[0]["image"]).size == (128, 128)
    videos = json.loads((root / "llava_video" / "tiny_world.json").read_text())
    frames = read_video(root / "llava_video" / videos[0]["video"])
    assert frames.shape == (8, 64, 64, 3)
    for name in BENCHMARKS:
        with open(root / "LMUData" / f"{name}.tsv") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert [int(r["index"]) for r in rows] == list(range(5))
        expected = benchmark_samples(name, 5)
        oracle = [json.loads(line) for line in (root / "LMUData" / f"{name}_oracle.jsonl").read_text().splitlines()]
        for row, sample, relevant in zip(rows, expected, oracle):
            assert row["question"] == sample.question.split("\n")[0]
            assert relevant["relevant"] == np.flatnonzero(sample.relevance).tolist()
            assert relevant["visual_tokens"] == len(sample.relevance)
            if name.endswith("MCQ"):
                assert row["answer"] in "ABCD" and row[row["answer"]] == sample.meta["short_answer"]
            if "video" in row:
                decoded = read_video(root / "LMUData" / "videos" / name / f"{row['video']}.mp4")
                assert np.array_equal(decoded, sample.video)  # lossless
            else:
                image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
                assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(sample.images[0]))
        if name == "TinyWorld_YN":
            assert {r["answer"] for r in rows} <= {"Yes", "No"}


def test_benchmarks_are_held_out_from_training():
    training = {image_sample(np.random.default_rng(s), "mcq").question for s in range(5)}
    held_out = benchmark_samples("TinyWorld_MCQ", 50)
    train_images = [np.asarray(image_sample(np.random.default_rng(s), "mcq").images[0]) for s in range(5)]
    assert training and not any(np.array_equal(np.asarray(h.images[0]), t) for h in held_out for t in train_images)
