"""The tiny models: built from their spec with seeded weights as a complete transformers checkpoint (weights,
config, tokenizer, image and video processors, chat template), pretrained on the tiny world once, then loaded from
the cache through `from_pretrained` like any real checkpoint. The default is a tiny LLaVA-OneVision
(configs/model/tiny.yaml); `family` picks another model family's classes (configs/model/tiny_qwen.yaml:
Qwen2.5-VL)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoProcessor

from covipal.cache import cached_directory
from covipal.models.architecture import set_generation_tokens
from covipal.models.families import family_named, llava_onevision
from covipal.models.loading import LoadedModel, load_pretrained
from covipal.models.tokenizer import TOKENIZER_VERSION
from covipal.tiny_world.pretrain import PretrainRecipe, pretrain
from covipal.tiny_world.synthetic import GENERATOR_VERSION

DEFAULT_FAMILY = llava_onevision.MODEL_TYPE  # model=tiny's family; its cache keys name no family


def tiny_spec(spec: dict | None, family: str = DEFAULT_FAMILY):
    """The family's architecture spec (a dataclass) from a config's `spec` mapping."""
    return family_named(family).spec_class(**(spec or {}))


def _family_key(family: str) -> dict:
    """Cache-key entries for the family: none for the default, so its cached checkpoints keep their keys."""
    return {} if family == DEFAULT_FAMILY else {"family": family}


def build_tiny(spec, directory: str | Path, family: str = DEFAULT_FAMILY) -> Path:
    """Build a seeded tiny model of `family` and its processor and save both as one transformers checkpoint."""
    directory = Path(directory)
    adapter = family_named(family)
    processor, config, _ = adapter.from_spec(asdict(spec))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = adapter.model_class._from_config(config, dtype=torch.float32)
    set_generation_tokens(model, processor.tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "tiny_spec.json").write_text(_spec_json(spec))
    return directory


def _spec_json(spec) -> str:
    return json.dumps(asdict(spec), indent=1, sort_keys=True)


def tiny_checkpoint(spec, cache_dir: str | Path | None = None, family: str = DEFAULT_FAMILY) -> Path:
    """The cached checkpoint of the untrained (seeded random) tiny model for `spec`."""
    key = {**asdict(spec), "tokenizer": TOKENIZER_VERSION, **_family_key(family)}
    return cached_directory("tiny", key, lambda directory: build_tiny(spec, directory, family), cache_dir)


def pretrain_tiny(
    spec, recipe: PretrainRecipe, directory: Path, progress: bool = True, family: str = DEFAULT_FAMILY
) -> Path:
    """Build the seeded tiny model in `directory`, pretrain it, and save it over the initial weights."""
    build_tiny(spec, directory, family)
    model = family_named(family).model_class.from_pretrained(directory, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(directory)
    log = pretrain(model, processor, recipe, progress=progress)
    model.save_pretrained(directory)
    (directory / "pretrain_recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    (directory / "pretrain_log.json").write_text(json.dumps(log))
    return directory


def tiny_base_checkpoint(
    spec,
    recipe: PretrainRecipe,
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
    family: str = DEFAULT_FAMILY,
) -> Path:
    """The cached pretrained checkpoint for (family, spec, recipe); pretrained now if absent. `steps=0` = random
    init."""
    if recipe.steps == 0:
        return tiny_checkpoint(spec, cache_dir, family)
    key = {
        "spec": asdict(spec),
        "pretrain": asdict(recipe),
        "generator": GENERATOR_VERSION,
        "tokenizer": TOKENIZER_VERSION,
        **_family_key(family),
    }
    build = lambda directory: pretrain_tiny(spec, recipe, directory, family=family)  # noqa: E731
    return cached_directory("tiny-base", key, build, cache_dir, rebuild)


def load_tiny(
    spec: dict | None = None,
    pretrain: dict | None = None,
    family: str = DEFAULT_FAMILY,
    name: str = "tiny",
    cache_dir: str | None = None,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    device: str = "cpu",
    ppm: dict | None = None,
    layer_plan: dict | None = None,
    evaluation: dict | None = None,
    adapter: str | None = None,
) -> LoadedModel:
    """Load the tiny model of `family` (pretraining it first when the cache lacks it)."""
    recipe = PretrainRecipe(**(pretrain or {}))
    directory = tiny_base_checkpoint(tiny_spec(spec, family), recipe, cache_dir, family=family)
    return load_pretrained(
        str(directory),
        attn_implementation,
        dtype,
        device,
        name=name,
        ppm=ppm,
        layer_plan=layer_plan,
        evaluation=evaluation,
        adapter=adapter,
    )
