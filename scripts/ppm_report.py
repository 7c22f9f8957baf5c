"""Accuracy of trained PPMs on the tiny-world benchmarks at r = 0.5 and 0.25, next to no pruning and FastV
(the closing figures of the stage-1/stage-2 issues: stage 1 only vs after stage 2, the k ablation).

    python scripts/ppm_report.py stage1=outputs/train/stage1/…/final stage2=outputs/train/stage2/…/final
    python scripts/ppm_report.py --questions 500 --ratios 0.25 k0.1=… k0.01=… k0.0001=…
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covipal import api
from covipal.tiny_world.accuracy import benchmark_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("classifiers", nargs="+", help="NAME=PPM_DIR")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--benchmarks", nargs="+", default=["TinyWorld_MCQ", "TinyWorld_Video_MCQ"])
    parser.add_argument("--override", action="append", default=[], help="extra config override (repeatable)")
    parser.add_argument("--output", default="outputs/ppm_report.json")
    args = parser.parse_args()
    rows: dict[str, dict[str, float]] = {}
    cfg = api.compose("eval", ["model=tiny", *args.override])
    loaded = api.build_model(cfg)
    settings = [("none", "none", [], 1.0)]
    settings += [(f"fastv r={r}", "fastv", [], r) for r in args.ratios]
    for name, path in (c.split("=", 1) for c in args.classifiers):
        settings += [(f"{name} r={r}", "covipal", [f"classifier={path}"], r) for r in args.ratios]
    for label, pruner, extra, ratio in settings:
        overrides = ["model=tiny", f"pruner={pruner}", *extra, *args.override]
        if pruner != "none":
            overrides.append(f"pruner.reserve_ratio={ratio}")
        built = api.build_pruner(api.compose("eval", overrides))
        rows[label] = {
            bench: benchmark_accuracy(loaded, built, bench, args.questions)["accuracy"] for bench in args.benchmarks
        }
        print(label, {k: round(100 * v, 1) for k, v in rows[label].items()}, flush=True)
    print("\n| setting | " + " | ".join(args.benchmarks) + " |\n|" + "---|" * (len(args.benchmarks) + 1))
    for label, scores in rows.items():
        print(f"| {label} | " + " | ".join(f"{100 * scores[b]:.1f}" for b in args.benchmarks) + " |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
