"""Accuracy of the tiny model on every tiny-world benchmark, unpruned, with random pruning at r = 0.5 and 0.25,
and with the ground-truth oracle at 0.25, per benchmark and per question kind (the README's tiny-world status;
the tables are printed and written next to the JSON as .md).

    python scripts/tiny_world_report.py                       # 2,000 questions per benchmark
    python scripts/tiny_world_report.py --questions 500 model.pretrain.steps=300
    python scripts/tiny_world_report.py model=tiny_qwen          # the tiny Qwen2.5-VL
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from covipal import api
from covipal.pruning.none import NoPruner
from covipal.pruning.random import RandomPruner
from covipal.tiny_world.accuracy import benchmark_accuracy
from covipal.tiny_world.export import BENCHMARKS
from covipal.tiny_world.oracle import OraclePruner

SETTINGS = {
    "none": lambda: NoPruner(),
    "random r=0.5": lambda: RandomPruner(0.5),
    "random r=0.25": lambda: RandomPruner(0.25),
    "oracle r=0.25": lambda: OraclePruner(0.25),
}


def markdown_tables(results: dict) -> str:
    """Two markdown tables: accuracy per benchmark, then per benchmark and question kind, each setting a column
    and oracle / none last."""
    header = "| benchmark | " + " | ".join(SETTINGS) + " | oracle / none |"
    lines = [header, "|" + "---|" * (len(SETTINGS) + 2)]
    for name in BENCHMARKS:
        cells = [100 * results[f"{name} | {s}"]["accuracy"] for s in SETTINGS]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {ratio(cells[-1], cells[0])} |")
    lines += [
        "",
        "| benchmark | kind | " + " | ".join(SETTINGS) + " | oracle / none |",
        "|" + "---|" * (len(SETTINGS) + 3),
    ]
    for name in BENCHMARKS:
        for kind in results[f"{name} | none"]["by_type"]:
            cells = [100 * results[f"{name} | {s}"]["by_type"][kind] for s in SETTINGS]
            row = " | ".join(f"{c:.1f}" for c in cells)
            lines.append(f"| {name} | {kind} | {row} | {ratio(cells[-1], cells[0])} |")
    return "\n".join(lines) + "\n"


def ratio(oracle: float, none: float) -> str:
    return f"{oracle / none:.2f}" if none else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--output", default="outputs/tiny_world_report.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrain.steps=300")
    args = parser.parse_args()
    chosen = [] if any(o.startswith("model=") for o in args.overrides) else ["model=tiny"]
    cfg = api.compose("eval", [*chosen, *args.overrides])
    start = time.perf_counter()
    loaded = api.build_model(cfg)
    print(f"model ready in {time.perf_counter() - start:.0f} s")
    results = {}
    for name in BENCHMARKS:
        for setting, make in SETTINGS.items():
            results[f"{name} | {setting}"] = benchmark_accuracy(loaded, make(), name, args.questions, progress=True)
    table = markdown_tables(results)
    print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    tables = Path(args.output).with_suffix(".md")
    tables.write_text(table)
    print(f"details (per question type, achieved r) in {args.output}, the tables in {tables}")


if __name__ == "__main__":
    main()
