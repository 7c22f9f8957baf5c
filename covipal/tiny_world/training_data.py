"""The tiny world's training split, generated once into the cache in the released layouts (LLaVA-NeXT-Data for
images, LLaVA-Video-178K for videos) and read by the same readers as the real data (configs/data/tiny_world.yaml)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from covipal.cache import cached_directory
from covipal.data.sources import llava_next, llava_video
from covipal.tiny_world.export import write_training_split
from covipal.tiny_world.synthetic import GENERATOR_VERSION


def tiny_world_split(images: int, videos: int, seed: int = 0, cache_dir: str | None = None) -> Path:
    """The tiny world's training split in the released layouts, generated once into the cache."""
    key = {"images": images, "videos": videos, "seed": seed, "generator": GENERATOR_VERSION}
    build = lambda directory: write_training_split(directory, images, videos, seed)  # noqa: E731
    return cached_directory("tiny-world-train", key, build, cache_dir)


def tiny_world_images(images: int = 2000, seed: int = 0, cache_dir: str | None = None, **kwargs) -> Dataset:
    """The synthetic image conversations, read by the LLaVA-NeXT-Data reader."""
    root = tiny_world_split(images, 0, seed, cache_dir)
    return llava_next(str(root / "llava_next" / "tiny_world.json"), seed=seed, **kwargs)


def tiny_world_videos(videos: int = 500, seed: int = 0, cache_dir: str | None = None, **kwargs) -> Dataset:
    """The synthetic video conversations, read by the LLaVA-Video-178K reader."""
    root = tiny_world_split(0, videos, seed, cache_dir)
    return llava_video(str(root / "llava_video" / "tiny_world.json"), seed=seed, **kwargs)
