"""Shared fixtures: one tiny LLaVA-OneVision checkpoint per test session, and inputs of every kind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from covipal.models.architecture import ArchitectureSpec  # noqa: E402
from covipal.tiny_world.model import build_tiny  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(2)

# Larger initial weights than the default 0.02, so an untrained model's greedy output varies with its input
# and generation tests can tell sequences apart.
TEST_SPEC = ArchitectureSpec(initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny(TEST_SPEC, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def load_tiny(tiny_dir, attn_implementation="sdpa"):
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def model(request, tiny_dir):
    return load_tiny(tiny_dir, request.param)


@pytest.fixture(scope="session")
def sdpa_model(tiny_dir):
    return load_tiny(tiny_dir, "sdpa")


def random_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(seed: int, frames: int = 8, size: int = 32) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (frames, size, size, 3), dtype=np.uint8)


def prompt(processor, text: str, images: int = 0, videos: int = 0) -> str:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_inputs(processor, kind: str, seed: int = 0):
    """Processor outputs for one sample of `kind`: image (anyres), multi_image, video or text."""
    if kind == "image":
        return processor(
            text=prompt(processor, "what colour is the circle at the left?", images=1),
            images=random_image(seed, 64, 96),
            return_tensors="pt",
        )
    if kind == "multi_image":
        return processor(
            text=prompt(processor, "are they the same?", images=2),
            images=[[random_image(seed, 40, 40), random_image(seed + 1, 64, 32)]],
            return_tensors="pt",
        )
    if kind == "video":
        return processor(
            text=prompt(processor, "what moves first?", videos=1), videos=[random_video(seed)], return_tensors="pt"
        )
    if kind == "text":
        return processor(text=prompt(processor, "how many objects are there?"), return_tensors="pt")
    raise ValueError(kind)


def make_image_batch(processor, seed: int = 0):
    """A padded batch of 2: a two-image prompt and a longer one-image anyres prompt (different n_v)."""
    texts = [
        prompt(processor, "are they the same?", images=2),
        prompt(processor, "what colour is the big square at the top right of the image?", images=1),
    ]
    images = [[random_image(seed, 40, 40), random_image(seed + 1, 64, 32)], [random_image(seed + 2, 64, 96)]]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.fixture(autouse=True)
def gradients_stay_on():
    """Gradients are a process-wide switch: a test that leaves them off (importing vlmeval before covipal's
    wrapper does) breaks every later training test, far from the cause. Fail the test that did it."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left gradients switched off for the whole process")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; they are skipped, never faked, on CPU machines."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
