"""Training data: the released layouts are read, subsets are seeded, truncation cuts text only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_image, random_video

from covipal.data.conversation import Conversation, TrainingCollator
from covipal.data.mixture import mixture
from covipal.data.sources import llava_next, llava_video, sample_frames
from covipal.errors import CovipalError
from covipal.tiny_world.export import write_video


def conversations(n: int, placeholder: str) -> list[dict]:
    return [
        {"from": "human", "value": f"{placeholder}\nwhat colour is the circle {n}?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and the square?"},
        {"from": "gpt", "value": "blue"},
    ]


@pytest.fixture
def next_json(tmp_path):
    (tmp_path / "imgs").mkdir()
    records = []
    for i in range(10):
        random_image(i, 40, 56).save(tmp_path / "imgs" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"imgs/{i}.png", "conversations": conversations(i, "<image>")})
    path = tmp_path / "next.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_next_json_and_parquet_read_the_same(next_json, tmp_path):
    from_json = llava_next(str(next_json))
    records = json.loads(next_json.read_text())
    for record in records:
        record["image"] = {"bytes": (tmp_path / record["image"]).read_bytes(), "path": None}
    parquet = tmp_path / "next.parquet"
    pd.DataFrame(records).to_parquet(parquet)
    from_parquet = llava_next(str(parquet))
    assert len(from_json) == len(from_parquet) == 10
    a, b = from_json[3], from_parquet[3]
    assert a.turns == b.turns == [("what colour is the circle 3?", "red"), ("and the square?", "blue")]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_fraction_is_a_seeded_subset(next_json):
    ids = lambda ds: [ds[i].id for i in range(len(ds))]  # noqa: E731
    assert ids(llava_next(str(next_json), fraction=0.3, seed=1)) == ids(
        llava_next(str(next_json), fraction=0.3, seed=1)
    )
    assert len(llava_next(str(next_json), fraction=0.3)) == 3
    assert ids(llava_next(str(next_json), fraction=0.5, seed=1)) != ids(
        llava_next(str(next_json), fraction=0.5, seed=2)
    )
    with pytest.raises(CovipalError, match="fraction=0"):
        llava_next(str(next_json), fraction=0)
    with pytest.raises(CovipalError, match="does not exist"):
        llava_next(str(next_json.parent / "missing.json"))


def test_llava_video_frames_are_sampled_uniformly(tmp_path):
    frames = np.stack([np.full((16, 16, 3), 10 * i, dtype=np.uint8) for i in range(20)])
    (tmp_path / "videos").mkdir()
    write_video(frames, tmp_path / "videos" / "a.mp4")
    record = {"id": "v", "video": "videos/a.mp4", "conversations": conversations(0, "<video>"), "data_source": "x"}
    (tmp_path / "v.json").write_text(json.dumps([record]))
    sample = llava_video(str(tmp_path / "v.json"), frames=5)[0]
    assert sample.video.shape == (5, 16, 16, 3)
    assert [int(f[0, 0, 0]) for f in sample.video] == [0, 50, 100, 140, 190]
    assert np.array_equal(sample_frames(tmp_path / "videos" / "a.mp4", 20), frames)


def test_mixture_concatenates_and_refuses_empty(next_json):
    data = mixture({"a": llava_next(str(next_json)), "b": llava_next(str(next_json), fraction=0.5)})
    assert len(data) == 15
    with pytest.raises(CovipalError, match="no sources"):
        mixture({})


def test_collator_labels_answers_only(processor):
    conv = Conversation([("what colour?", "red"), ("and now?", "blue")], images=[random_image(0, 32, 32)])
    batch = TrainingCollator(processor, max_length=None)([conv])
    supervised = batch["labels"][batch["labels"] != -100]
    assert processor.tokenizer.decode(supervised).replace(" ", "") == "red<|im_end|>blue<|im_end|>"


def test_truncation_cuts_text_never_images(processor):
    image = Conversation([("what colour?", "red " * 30)], images=[random_image(0, 32, 32)], id="img")
    video = Conversation([("what moves?", "blue")], video=random_video(1), id="vid")
    collate = TrainingCollator(processor, max_length=None)
    full = collate([image, video])
    lengths = full["attention_mask"].sum(1)
    visual_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in (processor.image_token, processor.video_token)]
    last_visual = max(i for i, t in enumerate(full["input_ids"][0].tolist()) if t in visual_ids)
    start = int((full["attention_mask"][0] == 0).sum())
    limit = last_visual - start + 5
    cut = TrainingCollator(processor, max_length=limit)([image, video])
    assert cut["attention_mask"].sum(1).tolist() == [limit, min(limit, int(lengths[1]))]
    row = cut["input_ids"][0][cut["attention_mask"][0].bool()]
    kept_full = full["input_ids"][0][full["attention_mask"][0].bool()][:limit]
    assert torch.equal(row, kept_full)
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    with pytest.raises(CovipalError, match="sample img: its visual tokens end at token"):
        TrainingCollator(processor, max_length=limit - 10)([image])


def test_unreadable_samples_are_skipped_and_counted(next_json, processor):
    (next_json.parent / "imgs" / "2.png").write_bytes(b"not a png")
    data = llava_next(str(next_json))
    stand_in = data[2]
    assert stand_in.id == "s3" and stand_in.skipped == ["s2"]
    batch = TrainingCollator(processor)([data[1], stand_in])
    assert batch["skipped_samples"] == 1
