"""Training data sources in their released layouts, read with the `datasets` library.

LLaVA-NeXT-Data: records {"id", "conversations": [{"from": "human"|"gpt", "value"}], "image"}, as json/jsonl
  with `image` a path under `image_folder`, or as the released parquet shards with `image` decoded by `datasets`
  (bytes). A "<image>" placeholder in the first human turn marks the image.
LLaVA-Video-178K: records {"id", "conversations", "video", "data_source"} in json files (e.g. the
  `0_30_s_academic_v0_1` *_processed.json files) with `video` a path under `video_folder`; `frames` frames are
  sampled uniformly over the whole video with PyAV.
Each source takes a seeded `fraction` of its records (the paper: 3% of LLaVA-NeXT-Data, 20% of the academic
subset of LLaVA-Video-178K).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from covipal.data.conversation import Conversation
from covipal.errors import CovipalError

logger = logging.getLogger(__name__)
PLACEHOLDERS = ("<image>", "<video>")


def _load_records(paths: list[str]):
    import datasets

    datasets.disable_progress_bars()
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise CovipalError(f"data file {missing[0]} does not exist; set its path in the data config")
    suffixes = {Path(p).suffix for p in paths}
    builder = "parquet" if suffixes == {".parquet"} else "json"
    return datasets.load_dataset(builder, data_files=list(paths), split="train")


def _subset(size: int, fraction: float, seed: int, limit: int | None) -> np.ndarray:
    if not 0 < fraction <= 1:
        raise CovipalError(f"data fraction={fraction} must be in (0, 1]")
    count = max(1, int(round(size * fraction)))
    if limit is not None:
        count = min(count, limit)
    return np.sort(np.random.default_rng(seed).permutation(size)[:count])


def turns_of(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs from LLaVA's {"from", "value"} list, without the visual placeholders."""
    turns = []
    for human, gpt in zip(conversations[0::2], conversations[1::2]):
        if human["from"] != "human" or gpt["from"] != "gpt":
            raise CovipalError(f"conversation turns must alternate human/gpt, got {human['from']}/{gpt['from']}")
        question = human["value"]
        for placeholder in PLACEHOLDERS:
            question = question.replace(placeholder + "\n", "").replace(placeholder, "")
        turns.append((question.strip(), gpt["value"]))
    return turns


def sample_frames(path: str | Path, frames: int) -> np.ndarray:
    """`frames` frames [F, H, W, 3] uint8 taken uniformly over the whole video."""
    with av.open(str(path)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not decoded:
        raise CovipalError(f"video {path} has no frames")
    index = np.linspace(0, len(decoded) - 1, frames).round().astype(int)
    return np.stack([decoded[i] for i in index])


class ConversationDataset(Dataset):
    """A seeded subset of one source; media are read when an item is taken."""

    def __init__(
        self,
        paths: str | list[str],
        media_folder: str | None = None,
        kind: str = "image",
        fraction: float = 1.0,
        seed: int = 0,
        limit: int | None = None,
        frames: int = 8,
    ):
        if kind not in ("image", "video"):
            raise CovipalError(f"data source kind={kind!r}: use image or video")
        paths = [paths] if isinstance(paths, str) else list(paths)
        self.paths = paths
        self.records = _load_records(paths)
        self.index = _subset(len(self.records), fraction, seed, limit)
        self.folder = Path(media_folder) if media_folder else Path(paths[0]).parent
        self.kind = kind
        self.frames = frames

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> Conversation:
        """The item, or — when its image or video cannot be read — the next readable one, with the unreadable
        ids in `skipped` (the trainer counts them in its log), so one bad file never stops an epoch."""
        skipped, first_failure = [], None
        for offset in range(len(self.index)):
            position = (item + offset) % len(self.index)
            record = self.records[int(self.index[position])]
            try:
                conversation = self._read(record, position)
            except (OSError, ValueError, av.error.FFmpegError) as error:
                skipped.append(str(record.get("id", position)))
                logger.warning("skipping unreadable sample %s (%s): %s", skipped[-1], self._media(record), error)
                first_failure = first_failure or f"{self._media(record)}: {error}"
                continue
            conversation.skipped = skipped
            return conversation
        raise CovipalError(
            f"none of the {len(self.index)} samples of {', '.join(self.paths)} could be read; "
            f"the first, {first_failure}"
        )

    def _media(self, record: dict) -> str:
        """The file an unreadable record is about: its image or video file, or for an embedded image the data file."""
        value = record.get(self.kind)
        if isinstance(value, dict):
            value = value.get("path")
        return str(self.folder / value) if isinstance(value, str) and value else self.paths[0]

    def _read(self, record: dict, position: int) -> Conversation:
        conversation = Conversation(turns_of(record["conversations"]), id=str(record.get("id", position)))
        if self.kind == "video" and record.get("video"):
            conversation.video = sample_frames(self.folder / record["video"], self.frames)
        elif self.kind == "image" and record.get("image"):
            conversation.images = [self._image(record["image"])]
        return conversation

    def _image(self, value) -> Image.Image:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):  # a datasets Image feature left undecoded
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value["path"]
        return Image.open(self.folder / value).convert("RGB")


def llava_next(path: str | list[str], image_folder: str | None = None, **kwargs) -> ConversationDataset:
    return ConversationDataset(path, image_folder, "image", **kwargs)


def llava_video(path: str | list[str], video_folder: str | None = None, **kwargs) -> ConversationDataset:
    return ConversationDataset(path, video_folder, "video", **kwargs)
