"""`python -m covipal.pretrain`: pretrain a tiny model on the tiny world (cached for model=tiny or
model=tiny_qwen), then score it on held-out multiple-choice questions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from covipal.api import build_model
from covipal.cli import run_hydra_entry, user_errors
from covipal.errors import CovipalError
from covipal.pruning.none import NoPruner
from covipal.tiny_world.accuracy import benchmark_accuracy
from covipal.tiny_world.model import DEFAULT_FAMILY, tiny_base_checkpoint, tiny_spec
from covipal.tiny_world.pretrain import PretrainRecipe


def run(cfg: DictConfig) -> dict:
    if not cfg.model._target_.endswith("tiny_world.model.load_tiny"):
        raise CovipalError("covipal.pretrain builds the tiny models only; use model=tiny or model=tiny_qwen")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    family = model_cfg.get("family", DEFAULT_FAMILY)
    spec, recipe = tiny_spec(model_cfg["spec"], family), PretrainRecipe(**model_cfg.get("pretrain", {}))
    start = time.perf_counter()
    directory = tiny_base_checkpoint(spec, recipe, model_cfg.get("cache_dir"), rebuild=cfg.force, family=family)
    seconds = time.perf_counter() - start
    loaded = build_model(cfg)
    metrics = {"checkpoint": str(directory), "pretrain_seconds": seconds}
    if cfg.eval_questions:
        metrics["held_out_mcq"] = benchmark_accuracy(loaded, NoPruner(), "TinyWorld_MCQ", cfg.eval_questions)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"tiny model: {directory} ({seconds:.0f} s)")
    if "held_out_mcq" in metrics:
        print(f"held-out multiple choice: {metrics['held_out_mcq']['accuracy']:.3f} on {cfg.eval_questions} questions")
    return metrics


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


def main() -> None:
    run_hydra_entry(_main)


if __name__ == "__main__":
    main()
