"""`python -m covipal.eval`: pruned generation on held-out tiny-world questions, scored, printed and written to
the run directory. (The VLMEvalKit benchmarks arrive with the evaluation issue.)"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from covipal.api import build_model, build_pruner
from covipal.cli import run_hydra_entry, user_errors
from covipal.data.export import benchmark_samples
from covipal.evaluation.scoring import is_correct
from covipal.inference import generate_answers


def evaluate(cfg: DictConfig) -> dict:
    torch.manual_seed(cfg.seed)
    pruner = build_pruner(cfg)  # first: a bad pruner setting fails before a model is loaded
    loaded = build_model(cfg)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    metrics = {"model": loaded.name, "pruner": OmegaConf.to_container(cfg.pruner, resolve=True), "benchmarks": {}}
    rows = []
    for name in cfg.benchmarks:
        samples = benchmark_samples(name, cfg.num_samples)
        answers = generate_answers(loaded, pruner, samples, cfg.max_new_tokens, cfg.batch_size)
        correct = [is_correct(s, a.text) for s, a in zip(samples, answers)]
        layers = torch.tensor([a.layer_visual_tokens for a in answers], dtype=torch.float64)
        metrics["benchmarks"][name] = {
            "accuracy": sum(correct) / len(correct),
            "questions": len(samples),
            "reserve_ratio_achieved": sum(a.reserve_ratio for a in answers) / len(answers),
            "mean_visual_tokens_input": sum(a.n_visual for a in answers) / len(answers),
            "mean_visual_tokens_per_layer": layers.mean(0).tolist(),
            "generate_seconds_per_sample": sum(a.prefill_seconds for a in answers) / len(answers),
        }
        for sample, answer, ok in zip(samples, answers, correct):
            rows.append(
                {
                    "benchmark": name,
                    "type": sample.meta["type"],
                    "question": sample.question,
                    "reference": sample.answer,
                    "correct": ok,
                    **vars(answer),
                }
            )
    with open(output / "answers.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{'benchmark':22} {'accuracy':>8} {'r achieved':>10}")
    for name, result in metrics["benchmarks"].items():
        print(f"{name:22} {result['accuracy']:8.3f} {result['reserve_ratio_achieved']:10.4f}")
    print(f"results in {output}")
    return metrics


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


def main() -> None:
    run_hydra_entry(_main)


if __name__ == "__main__":
    main()
