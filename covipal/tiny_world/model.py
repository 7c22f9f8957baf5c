"""The tiny default model: built from its spec with seeded weights as a complete transformers checkpoint (weights,
config, tokenizer, image and video processors, chat template), pretrained on the tiny world once, then loaded from
the cache through `from_pretrained` like any real checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from covipal.cache import cached_directory
from covipal.models.architecture import ArchitectureSpec, processor_and_config, set_generation_tokens
from covipal.models.loading import LoadedModel, load_pretrained
from covipal.models.tokenizer import TOKENIZER_VERSION
from covipal.tiny_world.pretrain import PretrainRecipe, pretrain
from covipal.tiny_world.synthetic import GENERATOR_VERSION


def build_tiny(spec: ArchitectureSpec, directory: str | Path) -> Path:
    """Build a seeded tiny model and its processor and save both as one transformers checkpoint."""
    directory = Path(directory)
    processor, config = processor_and_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.float32)
    set_generation_tokens(model, processor.tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "tiny_spec.json").write_text(_spec_json(spec))
    return directory


def _spec_json(spec: ArchitectureSpec) -> str:
    return json.dumps(asdict(spec), indent=1, sort_keys=True)


def tiny_checkpoint(spec: ArchitectureSpec, cache_dir: str | Path | None = None) -> Path:
    """The cached checkpoint of the untrained (seeded random) tiny model for `spec`."""
    key = {**asdict(spec), "tokenizer": TOKENIZER_VERSION}
    return cached_directory("tiny", key, lambda directory: build_tiny(spec, directory), cache_dir)


def pretrain_tiny(spec: ArchitectureSpec, recipe: PretrainRecipe, directory: Path, progress: bool = True) -> Path:
    """Build the seeded tiny model in `directory`, pretrain it, and save it over the initial weights."""
    build_tiny(spec, directory)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(directory)
    log = pretrain(model, processor, recipe, progress=progress)
    model.save_pretrained(directory)
    (directory / "pretrain_recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    (directory / "pretrain_log.json").write_text(json.dumps(log))
    return directory


def tiny_base_checkpoint(
    spec: ArchitectureSpec, recipe: PretrainRecipe, cache_dir: str | Path | None = None, rebuild: bool = False
) -> Path:
    """The cached pretrained checkpoint for (spec, recipe); pretrained now if absent. `steps=0` = random init."""
    if recipe.steps == 0:
        return tiny_checkpoint(spec, cache_dir)
    key = {
        "spec": asdict(spec),
        "pretrain": asdict(recipe),
        "generator": GENERATOR_VERSION,
        "tokenizer": TOKENIZER_VERSION,
    }
    build = lambda directory: pretrain_tiny(spec, recipe, directory)  # noqa: E731
    return cached_directory("tiny-base", key, build, cache_dir, rebuild)


def load_tiny(
    spec: dict | None = None,
    pretrain: dict | None = None,
    cache_dir: str | None = None,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    device: str = "cpu",
    ppm: dict | None = None,
    layer_plan: dict | None = None,
    evaluation: dict | None = None,
    adapter: str | None = None,
) -> LoadedModel:
    """Load the tiny model (pretraining it first when the cache lacks it)."""
    directory = tiny_base_checkpoint(ArchitectureSpec(**(spec or {})), PretrainRecipe(**(pretrain or {})), cache_dir)
    return load_pretrained(
        str(directory),
        attn_implementation,
        dtype,
        device,
        name="tiny",
        ppm=ppm,
        layer_plan=layer_plan,
        evaluation=evaluation,
        adapter=adapter,
    )
