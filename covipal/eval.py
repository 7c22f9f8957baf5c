"""`python -m covipal.eval`: pruned generation on demo samples, printed and written to the run directory.

(VLMEvalKit benchmarks replace the demo samples in the evaluation issue.)"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from covipal.api import build_model, build_pruner
from covipal.cli import run_hydra_entry, user_errors
from covipal.data.demo import demo_samples
from covipal.inference import generate_answers


def evaluate(cfg: DictConfig) -> dict:
    torch.manual_seed(cfg.seed)
    pruner = build_pruner(cfg)  # first: a bad pruner setting fails before a model is loaded
    loaded = build_model(cfg)
    samples = demo_samples(cfg.num_samples, seed=cfg.seed, frames=cfg.video_frames)
    answers = generate_answers(loaded, pruner, samples, cfg.max_new_tokens, cfg.batch_size)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "answers.jsonl", "w") as handle:
        for sample, answer in zip(samples, answers):
            row = {"kind": sample.kind, "question": sample.question, "reference": sample.answer, **vars(answer)}
            handle.write(json.dumps(row) + "\n")
    layers = torch.tensor([a.layer_visual_tokens for a in answers], dtype=torch.float64)
    metrics = {
        "model": loaded.name,
        "pruner": OmegaConf.to_container(cfg.pruner, resolve=True),
        "samples": len(samples),
        "reserve_ratio_achieved": sum(a.reserve_ratio for a in answers) / len(answers),
        "mean_visual_tokens_per_layer": layers.mean(0).tolist(),
        "mean_visual_tokens_input": sum(a.n_visual for a in answers) / len(answers),
        "generate_seconds_per_sample": sum(a.prefill_seconds for a in answers) / len(answers),
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{'kind':6} {'n_v':>5} {'r':>6}  answer")
    for sample, answer in zip(samples, answers):
        print(f"{sample.kind:6} {answer.n_visual:5d} {answer.reserve_ratio:6.3f}  {answer.text!r}")
    print(f"average reserve ratio {metrics['reserve_ratio_achieved']:.4f}; results in {output}")
    return metrics


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


def main() -> None:
    run_hydra_entry(_main)


if __name__ == "__main__":
    main()
