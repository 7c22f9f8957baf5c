"""Rank quality of a stage-1 run's PPM on held-out data, next to the untrained PPM it started from.

    python scripts/stage1_ranking.py outputs/train/stage1/<date>/<time> [--samples 256] [--seed 777]

Rebuilds the run's model and data from its config.json with another data seed (so the samples are held out
for the synthetic world), and prints/saves `ranking.json` in the run directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from covipal.api import build_model  # noqa: E402
from covipal.data.conversation import TrainingCollator  # noqa: E402
from covipal.models.ppm import PPMClassifier  # noqa: E402
from covipal.train import apply_aspect_ratio, build_data, new_ppm  # noqa: E402
from covipal.training.guidance import GuidanceProbe  # noqa: E402
from covipal.training.ranking import ranking_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=777, help="data seed of the held-out samples")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = OmegaConf.create(json.loads((args.run_dir / "config.json").read_text()))
    cfg.seed = args.seed
    for node in cfg.data.sources.values():
        if "seed" in node:
            node.seed = args.seed
    loaded = build_model(cfg)
    apply_aspect_ratio(loaded, cfg.data.get("vision_aspect_ratio"))
    data = build_data(cfg)
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.samples]
    collate = TrainingCollator(loaded.processor, cfg.data.max_length, labels=False)
    loader = DataLoader(Subset(data, index.tolist()), batch_size=args.batch_size, collate_fn=collate)
    width = loaded.model.config.text_config.hidden_size
    trained = PPMClassifier.from_pretrained(args.run_dir / "final", expected_input_size=width).eval()
    untrained = new_ppm(loaded, json.loads((args.run_dir / "config.json").read_text())["seed"]).eval()
    s1 = cfg.stage1
    probe = GuidanceProbe(loaded.model.eval(), s1.guidance_layer, s1.query_rows, s1.normalize_labels, s1.chunk)
    report = ranking_report(loaded.model, {"trained": trained, "untrained": untrained}, loader, probe)
    (args.run_dir / "ranking.json").write_text(json.dumps(report, indent=1))
    for name, values in report.items():
        print(name, " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))


if __name__ == "__main__":
    main()
