"""`python -m covipal.eval`: a model with a pruner on benchmarks, through VLMEvalKit's own inference and scoring.

The default is the tiny model on the tiny world's benchmarks (generated into the data root on first use; offline,
exact-match scoring). Under torchrun each rank answers its share of every benchmark (VLMEvalKit's sharding) and
rank 0 scores and writes `metrics.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from covipal.api import build_model, build_pruner
from covipal.cache import default_cache_dir
from covipal.cli import CONFIG_DIR, run_hydra_entry, user_errors
from covipal.errors import CovipalError

KINDS = ("mcq", "yes_no", "vqa", "video_mcq", "official")


def _join_process_group() -> None:
    """Under torchrun: the process group VLMEvalKit's barriers need, and this rank's GPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _pruner_choice() -> str | None:
    """The `pruner=` choice of this job (None outside a Hydra run, e.g. from the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("pruner") if HydraConfig.initialized() else None


def _method_name(pruner: str | None, adapter: str | None) -> str | None:
    """The pruner's name; with a LoRA adapter trained under it, starred as the papers write PDrop*."""
    return f"{pruner}*" if pruner and adapter else pruner


def claim_output_dir(output: Path, cfg: DictConfig, write: bool) -> None:
    """Resuming reuses the predictions found in `output`: refuse a directory that holds another configuration's
    (e.g. two sweeps whose jobs differ only in an excluded path such as `adapter=` or `classifier=`)."""
    identity = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in ("model", "pruner", "adapter", "classifier", "max_new_tokens")
    }
    path = output / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        differing = [key for key in identity if previous.get(key) != identity[key]]
        if differing:
            raise CovipalError(
                f"{output} holds results of another configuration ({', '.join(differing)} differ); give this run "
                "its own directory with label=<name> (in a sweep) or hydra.run.dir=<new dir>"
            )
    elif write:
        output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=1))


def _benchmarks(cfg: DictConfig) -> dict[str, str]:
    datasets = OmegaConf.to_container(cfg.benchmark.datasets, resolve=True)
    for name, kind in datasets.items():
        if kind not in KINDS:
            raise CovipalError(f"benchmark.datasets.{name}={kind} is not a kind; use one of: {', '.join(KINDS)}")
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise CovipalError(f"num_samples={cfg.num_samples} must be at least 1 (or null for every question)")
    return datasets


def evaluate(cfg: DictConfig) -> dict | None:
    torch.manual_seed(cfg.seed)
    pruner = build_pruner(cfg)  # first: a bad pruner or benchmark setting fails before a model is loaded
    datasets = _benchmarks(cfg)
    # VLMEvalKit takes a while to import: only once the settings are known to be good
    from covipal.evaluation.vlmevalkit.datasets import check_available, register_local_sets
    from covipal.evaluation.vlmevalkit.model import PrunedVLM
    from covipal.evaluation.vlmevalkit.runner import run_benchmark, vlmeval_environment
    from covipal.tiny_world.export import BENCHMARKS, benchmark_relevance, ensure_benchmarks
    from covipal.tiny_world.layout import layout_of

    root = vlmeval_environment(cfg.data_root or os.environ.get("LMUData") or default_cache_dir() / "LMUData")
    tiny_world = [name for name in datasets if name in BENCHMARKS]
    for name, kind in datasets.items():
        if name not in tiny_world:  # before a model is loaded
            check_available(name, kind)
    _join_process_group()
    from vlmeval.smp import get_rank_and_world_size

    rank, _ = get_rank_and_world_size()
    claim_output_dir(Path(cfg.output_dir), cfg, write=rank == 0)
    loaded = build_model(cfg)
    pruner.setup(loaded.model)  # a budget this model cannot meet stops here, before data and answers
    layout = layout_of(loaded.model, loaded.processor) if tiny_world else None  # the ground truth's coordinates
    if tiny_world and rank == 0:
        ensure_benchmarks(root, tiny_world, max(cfg.benchmark.tiny_world_rows, cfg.num_samples or 0), layout=layout)
    if dist.is_initialized():
        dist.barrier()
    register_local_sets(
        yes_no=[n for n, k in datasets.items() if k == "yes_no"],
        video_mcq=[n for n, k in datasets.items() if k == "video_mcq"],
    )
    vlm = PrunedVLM.for_run(loaded, pruner, cfg.max_new_tokens)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    vlm.heatmaps, vlm.heatmap_dir = cfg.heatmaps, output / "heatmaps"
    metrics = {
        "model": loaded.name,
        "method": cfg.label or _method_name(_pruner_choice(), cfg.get("adapter")),
        "pruner": OmegaConf.to_container(cfg.pruner, resolve=True),
        "adapter": cfg.get("adapter"),
        "seed": cfg.seed,
        "data_root": str(root),
        "benchmarks": {},
    }
    with vlm:
        for name, kind in datasets.items():
            vlm.relevance = benchmark_relevance(root, name, layout) if name in tiny_world else None
            result = run_benchmark(vlm, name, kind, output, loaded.name, cfg.num_samples, cfg.benchmark.judge)
            if result is not None:
                metrics["benchmarks"][name] = result
    if rank != 0:
        return None
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{'benchmark':24} {'score':>7} {'r achieved':>10} {'prefill s':>9} {'relevant kept':>13}")
    for name, result in metrics["benchmarks"].items():
        score = "n/a" if result["score"] is None else f"{result['score']:.1f}"
        ratio = result.get("reserve_ratio_achieved", float("nan"))
        kept = result.get("relevant_kept_last_layer")
        kept = "–" if kept is None else f"{100 * kept:.1f}%"
        prefill = result.get("prefill_seconds_per_sample", float("nan"))
        print(f"{name:24} {score:>7} {ratio:10.4f} {prefill:9.4f} {kept:>13}")
    for name, result in metrics["benchmarks"].items():
        if result.get("failed_rows"):
            print(f"{name}: {result['failed_rows']} of {result['questions']} rows unreadable, scored as wrong")
    print(f"results in {output}")
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


def main() -> None:
    run_hydra_entry(_main)


if __name__ == "__main__":
    main()
