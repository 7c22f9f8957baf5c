"""`python -m covipal.report MULTIRUN_DIR`: the paper-style table of an evaluation sweep.

Reads every `metrics.json` under the directory (one per `covipal.eval` job), and writes next to them
`report.md` and `report.csv` — one row per method and target reserve ratio: the score on each benchmark, the
achieved reserve ratio, and Avg % (the mean over benchmarks of the score relative to the unpruned model's, from the
sweep's `pruner=none` job of the same model) — and `report.png`, the mean score against the achieved reserve ratio
per method. The table is also printed.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from covipal.errors import CovipalError


def load_runs(directory: Path) -> list[dict]:
    runs = []
    for path in sorted(directory.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if "benchmarks" in metrics and "pruner" in metrics:
            metrics["job"] = str(path.parent.relative_to(directory))
            runs.append(metrics)
    if not runs:
        raise CovipalError(f"no evaluation results (metrics.json) under {directory}; pass a covipal.eval run or sweep")
    return runs


def method_of(run: dict) -> str:
    return run.get("method") or run["pruner"]["_target_"].rsplit(".", 1)[-1].removesuffix("Pruner").lower()


def table_rows(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """(benchmark names, rows) with rows sorted by model, method (none first) and descending target ratio."""
    benchmarks = sorted({name for run in runs for name in run["benchmarks"]})
    baseline = {}
    for run in runs:
        if method_of(run) == "none":
            baseline.setdefault(run["model"], run)
    rows = []
    for run in runs:
        method = method_of(run)
        target = 1.0 if method == "none" else float(run["pruner"].get("reserve_ratio", 1.0))
        scores = {name: run["benchmarks"][name].get("score") for name in benchmarks if name in run["benchmarks"]}
        achieved = [r.get("reserve_ratio_achieved") for r in run["benchmarks"].values()]
        achieved = [a for a in achieved if a is not None]
        reference = baseline.get(run["model"])
        relative = []
        if reference is not None:
            for name, score in scores.items():
                base = reference["benchmarks"].get(name, {}).get("score")
                if score is not None and base:
                    relative.append(100 * score / base)
        rows.append(
            {
                "model": run["model"],
                "method": method,
                "target_r": target,
                "achieved_r": sum(achieved) / len(achieved) if achieved else None,
                "scores": scores,
                "avg_relative": sum(relative) / len(relative) if relative else None,
                "job": run["job"],
            }
        )
    # one `none` row per model: the sweep may run it once per ratio, with the same result
    seen, unique = set(), []
    for row in sorted(rows, key=lambda r: (r["model"], r["method"] != "none", r["method"], -r["target_r"])):
        key = (row["model"], row["method"], row["target_r"])
        if row["method"] == "none" and key in seen:
            continue
        seen.add(key)
        unique.append(row)
    return benchmarks, unique


def _cell(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(benchmarks: list[str], rows: list[dict]) -> str:
    header = ["model", "method", "r", "r achieved", *benchmarks, "Avg %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["method"], _cell(row["target_r"], 2), _cell(row["achieved_r"], 3)]
        cells += [_cell(row["scores"].get(name)) for name in benchmarks]
        cells.append(_cell(row["avg_relative"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, benchmarks: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "method", "target_r", "achieved_r", *benchmarks, "avg_relative", "job"])
        for row in rows:
            scores = [row["scores"].get(name) for name in benchmarks]
            writer.writerow(
                [
                    row["model"],
                    row["method"],
                    row["target_r"],
                    row["achieved_r"],
                    *scores,
                    row["avg_relative"],
                    row["job"],
                ]
            )


def plot(path: Path, rows: list[dict]) -> None:
    """Mean benchmark score against the achieved reserve ratio, one line per (model, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    lines: dict[tuple, list] = {}
    for row in rows:
        scores = [s for s in row["scores"].values() if s is not None]
        if row["achieved_r"] is not None and scores:
            lines.setdefault((row["model"], row["method"]), []).append((row["achieved_r"], sum(scores) / len(scores)))
    for (model, method), points in sorted(lines.items()):
        points.sort()
        label = method if len({m for m, _ in lines}) == 1 else f"{model} {method}"
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel("achieved reserve ratio r")
    axes.set_ylabel("mean score over benchmarks")
    axes.grid(alpha=0.3)
    if lines:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(directory: str | Path) -> str:
    directory = Path(directory)
    benchmarks, rows = table_rows(load_runs(directory))
    text = markdown(benchmarks, rows)
    (directory / "report.md").write_text(text)
    write_csv(directory / "report.csv", benchmarks, rows)
    plot(directory / "report.png", rows)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a covipal.eval sweep (multirun) directory, or a single run's")
    args = parser.parse_args(argv)
    try:
        print(report(args.directory), end="")
    except CovipalError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"written: {Path(args.directory) / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
