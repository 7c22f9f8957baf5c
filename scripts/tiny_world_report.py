"""Accuracy of the tiny model on every tiny-world benchmark, unpruned, with random pruning at r = 0.5 and 0.25,
and with the ground-truth oracle at 0.25 (the closing figures of the tiny-world issue).

    python scripts/tiny_world_report.py                       # 2,000 questions per benchmark
    python scripts/tiny_world_report.py --questions 500 model.pretrain.steps=300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from covipal import api
from covipal.data.export import BENCHMARKS
from covipal.evaluation.tiny_world import benchmark_accuracy
from covipal.pruning.none import NoPruner
from covipal.pruning.oracle import OraclePruner
from covipal.pruning.random import RandomPruner

SETTINGS = {
    "none": lambda: NoPruner(),
    "random r=0.5": lambda: RandomPruner(0.5),
    "random r=0.25": lambda: RandomPruner(0.25),
    "oracle r=0.25": lambda: OraclePruner(0.25),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--output", default="outputs/tiny_world_report.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrain.steps=300")
    args = parser.parse_args()
    cfg = api.compose("eval", ["model=tiny", *args.overrides])
    start = time.perf_counter()
    loaded = api.build_model(cfg)
    print(f"model ready in {time.perf_counter() - start:.0f} s")
    results = {}
    for name in BENCHMARKS:
        for setting, make in SETTINGS.items():
            results[f"{name} | {setting}"] = benchmark_accuracy(loaded, make(), name, args.questions, progress=True)
    header = "| benchmark | " + " | ".join(SETTINGS) + " |"
    print(header + "\n|" + "---|" * (len(SETTINGS) + 1))
    for name in BENCHMARKS:
        cells = [f"{100 * results[f'{name} | {s}']['accuracy']:.1f}" for s in SETTINGS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"details (per question type, achieved r) in {args.output}")


if __name__ == "__main__":
    main()
