"""How well each stage-1 label mode — and any trained PPM — finds the visual tokens a question is about, on
held-out tiny-world image questions, against their ground-truth relevance (which no label or PPM reads).

    python scripts/label_report.py                                   # every label mode, default tiny model
    python scripts/label_report.py --ppm s1=outputs/train/stage1/<date>/<time>/final --samples 512
    python scripts/label_report.py --layer 2 --ratio 0.5 model.pretrain.seed=1

Rows are the labels of each `stage1.query_rows` mode and `stage1.reduce` (sum or max over heads and rows at
the guidance layer, on the prompt exactly as inference gives it), each PPM's scores, keeping the first tokens,
and random. Columns (means over samples, top k = floor(r · n_v)): recall of the relevant tokens in the top k,
Spearman correlation with token position, share of the top k in the base tile, and for a PPM the overlap of its
top k with its own training labels (read from its run's config.json). Writes the table and a JSON next to `--output`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from covipal import api  # noqa: E402
from covipal.data.conversation import TrainingCollator, from_sample, turn_token_ids  # noqa: E402
from covipal.models.ppm import PPMClassifier  # noqa: E402
from covipal.tiny_world.export import benchmark_samples  # noqa: E402
from covipal.tiny_world.label_quality import ranking_quality  # noqa: E402
from covipal.training.guidance import QUERY_ROWS, REDUCTIONS, GuidanceProbe  # noqa: E402

IMAGE_BENCHMARKS = ("TinyWorld_MCQ", "TinyWorld_VQA", "TinyWorld_YN")


def labels_name(query_rows: str, reduce: str) -> str:
    return f"{query_rows} / {reduce}"


def trained_on(ppm_dir: Path) -> str | None:
    """The labels a stage-1 PPM was trained on (its run directory's config.json), if known; None for a stage-2 PPM
    (trained end to end, on no labels)."""
    config = ppm_dir.parent / "config.json"
    if not config.is_file():
        return None
    settings = json.loads(config.read_text())
    if settings.get("stage") != 1:
        return None
    stage1 = settings.get("stage1", {})
    return labels_name(stage1.get("query_rows", "literal"), stage1.get("reduce", "sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppm", action="append", default=[], help="NAME=PPM_DIR (repeatable)")
    parser.add_argument("--samples", type=int, default=256, help="held-out image questions, split over the 3 sets")
    parser.add_argument("--layer", type=int, default=None, help="guidance layer (default: the model's)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="outputs/label_report.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrain.seed=1")
    args = parser.parse_args()
    cfg = api.compose("train", ["stage=1", *args.overrides])
    loaded = api.build_model(cfg)
    model = loaded.model.eval()
    layer = cfg.stage1.guidance_layer if args.layer is None else args.layer
    turn_ids = turn_token_ids(loaded.processor.tokenizer)
    probes = {
        labels_name(mode, reduce): GuidanceProbe(model, layer, mode, turn_ids=turn_ids, reduce=reduce)
        for reduce in REDUCTIONS
        for mode in QUERY_ROWS
    }
    width = model.config.text_config.hidden_size
    ppms = {}
    for name, path in (item.split("=", 1) for item in args.ppm):
        ppm = PPMClassifier.from_pretrained(Path(path), expected_input_size=width).eval()
        ppms[name] = (ppm, trained_on(Path(path)))
    per_set = -(-args.samples // len(IMAGE_BENCHMARKS))
    samples = [s for name in IMAGE_BENCHMARKS for s in benchmark_samples(name, per_set)][: args.samples]
    collate = TrainingCollator(loaded.processor, None, labels=False, prompt_only=True)
    batches = DataLoader([from_sample(s) for s in samples], batch_size=args.batch_size, collate_fn=collate)
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    results = ranking_quality(probes, ppms, batches, [s.relevance for s in samples], base, args.ratio)
    lines = [
        f"layer {layer}, {len(samples)} held-out image questions, top {args.ratio:g} of the visual tokens",
        "| ranking | recall of relevant tokens | Spearman(ranking, position) | top share in the base tile "
        "| overlap with own labels |",
        "|---|---|---|---|---|",
    ]
    cell = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for name, values in results.items():
        label = f"{name} (labels)" if name in probes else name
        if name in ppms:
            label = f"PPM {name}" + (f" (trained on {ppms[name][1]})" if ppms[name][1] else "")
        keys = ("recall", "spearman_pos", "base_tile", "label_overlap")
        lines.append(f"| {label} | " + " | ".join(cell(values[k]) for k in keys) + " |")
    print("\n".join(lines))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"layer": layer, "ratio": args.ratio, "results": results}, indent=1))
    print(f"written: {args.output}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
