"""`python -m covipal.report DIR`: the paper-style table of one or more evaluation sweeps, with intervals.

Reads every `metrics.json` under DIR (one per `covipal.eval` job) and the per-question files beside them, and
writes `report.md`, `report.csv` and `report.png` into DIR. One row per method and target reserve ratio:

- each benchmark's score and their mean (points; ± the standard deviation over seeds of the mean, where there
  are several), the achieved reserve ratio, Avg % (mean over benchmarks of the score relative to the unpruned
  model's: the sweep's `pruner=none` job of the same model);
- Δ none and Δ random: the difference of the mean score to `none` and to `random` at the same target r, with a
  95% paired bootstrap interval over questions (each benchmark a stratum; `covipal/evaluation/intervals.py`);
  report.csv also has each benchmark's own differences and intervals;
- on the tiny world, the share of each question's relevant visual tokens the method keeps, at the last LLM
  layer and averaged over layers (they differ for methods that drop inside the LLM);
- loyalty: the share of questions answered exactly as the unpruned model answers them;
- with `--versus METHOD` (repeatable), the same interval against that method at the same target r.

Jobs that differ only in `seed` (the eval seed, which seeds `random` and picks a PPM with
`classifier='runs/s${seed}/final'` or a LoRA adapter with `adapter=…`) are one method: their scores are averaged,
a question's hit is its mean over the seeds, and `seeds` counts them. Give different PPMs different `label=`s.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covipal.errors import CovipalError
from covipal.evaluation.intervals import Interval, paired_bootstrap
from covipal.evaluation.scoring import normalise

IDENTITY_EXCLUDES = ("seed", "classifier")  # pruner fields that name a seed's own instance, not the method


def load_runs(directory: Path) -> list[dict]:
    runs = []
    for path in sorted(directory.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if "benchmarks" in metrics and "pruner" in metrics:
            metrics["job"] = str(path.parent.relative_to(directory))
            metrics["questions"] = {}
            for name, result in metrics["benchmarks"].items():
                questions = path.parent / result.get("questions_file", f"questions/{name}.jsonl")
                if questions.is_file():
                    rows = [json.loads(line) for line in questions.read_text().splitlines() if line.strip()]
                    metrics["questions"][name] = {row["index"]: row for row in rows}
            runs.append(metrics)
    if not runs:
        raise CovipalError(f"no evaluation results (metrics.json) under {directory}; pass a covipal.eval run or sweep")
    return runs


def method_of(run: dict) -> str:
    return run.get("method") or run["pruner"]["_target_"].rsplit(".", 1)[-1].removesuffix("Pruner").lower()


def target_of(run: dict) -> float:
    return 1.0 if method_of(run) == "none" else float(run["pruner"].get("reserve_ratio", 1.0))


def group_key(run: dict) -> tuple:
    pruner = {k: v for k, v in run["pruner"].items() if k not in IDENTITY_EXCLUDES and method_of(run) != "none"}
    adapted = run.get("adapter") is not None  # its path names a seed's own LoRA run, like `classifier`
    return run["model"], method_of(run), target_of(run), json.dumps(pruner, sort_keys=True), adapted


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class Method:
    """The jobs of one method at one target ratio (one per seed)."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        first = runs[0]
        self.model, self.method, self.target_r = first["model"], method_of(first), target_of(first)
        self.benchmarks = sorted({name for run in runs for name in run["benchmarks"]})
        self.seeds = len({run.get("seed") for run in runs})

    def score(self, name: str) -> float | None:
        return _mean(run["benchmarks"].get(name, {}).get("score") for run in self.runs)

    def seed_spread(self) -> float | None:
        """Standard deviation over the seeds of the mean score over benchmarks (None for one seed)."""
        means = [_mean(run["benchmarks"].get(name, {}).get("score") for name in self.benchmarks) for run in self.runs]
        means = [m for m in means if m is not None]
        return float(np.std(means, ddof=1)) if len(means) > 1 else None

    def statistic(self, key: str) -> float | None:
        """Mean over benchmarks (and seeds) of a per-benchmark statistic of metrics.json."""
        return _mean(result.get(key) for run in self.runs for result in run["benchmarks"].values())

    def hits(self, name: str) -> dict[str, float]:
        """index -> mean hit over the seeds that scored it."""
        collected = defaultdict(list)
        for run in self.runs:
            for index, row in run["questions"].get(name, {}).items():
                if row.get("hit") is not None:
                    collected[index].append(row["hit"])
        return {index: float(np.mean(values)) for index, values in collected.items()}

    def loyalty(self, reference: Method) -> float | None:
        """Share of questions (over benchmarks and seeds) answered as `reference` (the unpruned model) answers."""
        shares = []
        for name in self.benchmarks:
            answers = {
                i: normalise(r["prediction"])
                for run in reference.runs
                for i, r in run["questions"].get(name, {}).items()
            }
            for run in self.runs:
                rows = run["questions"].get(name, {})
                same = [normalise(row["prediction"]) == answers[i] for i, row in rows.items() if i in answers]
                if same:
                    shares.append(np.mean(same))
        return 100 * float(np.mean(shares)) if shares else None


def difference(method: Method, reference: Method | None, benchmarks: list[str] | None = None, seed: int = 0):
    """Paired bootstrap interval (points) of the mean score difference `method` − `reference` over `benchmarks`
    (default: all of the method's), each a stratum; None without a reference or without common questions."""
    if reference is None or reference is method:
        return None
    pairs = []
    for name in benchmarks or method.benchmarks:
        ours, theirs = method.hits(name), reference.hits(name)
        common = sorted(set(ours) & set(theirs))
        if not common:
            return None
        pairs.append((np.array([ours[i] for i in common]), np.array([theirs[i] for i in common])))
    return paired_bootstrap(pairs, seed=seed).scaled(100)


def build_rows(runs: list[dict], versus: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
    """(benchmark names, rows) sorted by model, method (none first, random second) and descending target ratio.
    `versus`: more methods (by name) every row is compared with, at the same model and target ratio."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[group_key(run)].append(run)
    methods = [Method(group) for group in groups.values()]
    benchmarks = sorted({name for m in methods for name in m.benchmarks})
    none = {m.model: m for m in methods if m.method == "none"}
    random = {(m.model, m.target_r): m for m in methods if m.method == "random"}
    named = {(m.model, m.method, m.target_r): m for m in methods}
    rows = []
    order = {"none": 0, "random": 1}
    for m in sorted(methods, key=lambda m: (m.model, order.get(m.method, 2), m.method, -m.target_r)):
        reference = none.get(m.model)
        scores = {name: m.score(name) for name in benchmarks if name in m.benchmarks}
        relative = []
        if reference is not None:
            for name, score in scores.items():
                base = reference.score(name)
                if score is not None and base:
                    relative.append(100 * score / base)
        rows.append(
            {
                "model": m.model,
                "method": m.method,
                "target_r": m.target_r,
                "achieved_r": m.statistic("reserve_ratio_achieved"),
                "seeds": m.seeds,
                "scores": scores,
                "mean": _mean(scores.values()),
                "seed_sd": m.seed_spread(),
                "avg_relative": _mean(relative),
                "vs_none": difference(m, reference),
                "vs_random": difference(m, random.get((m.model, m.target_r))),
                "per_benchmark": {
                    name: (difference(m, reference, [name]), difference(m, random.get((m.model, m.target_r)), [name]))
                    for name in scores
                },
                "relevant_kept_last": _percent(m.statistic("relevant_kept_last_layer")),
                "relevant_kept_layers": _percent(m.statistic("relevant_kept_mean_over_layers")),
                "loyalty": None if reference is None else m.loyalty(reference),
                "versus": {name: difference(m, named.get((m.model, name, m.target_r))) for name in versus},
                "jobs": [run["job"] for run in m.runs],
            }
        )
    return benchmarks, rows


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _cell(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(value: Interval | None) -> str:
    return "–" if value is None else f"{value.difference:+.1f} [{value.low:+.1f}, {value.high:+.1f}]"


def markdown(benchmarks: list[str], rows: list[dict], versus: Sequence[str] = ()) -> str:
    header = ["model", "method", "r", "r achieved", "seeds", *benchmarks, "mean", "Avg %", "Δ none [95%]"]
    header += ["Δ random [95%]", *(f"Δ {name} [95%]" for name in versus)]
    header += ["relevant kept (last layer)", "relevant kept (layer mean)", "loyalty"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["method"], _cell(row["target_r"], 2), _cell(row["achieved_r"], 3), str(row["seeds"])]
        cells += [_cell(row["scores"].get(name)) for name in benchmarks]
        spread = "" if row["seed_sd"] is None else f" ± {row['seed_sd']:.1f}"
        cells += [_cell(row["mean"]) + spread, _cell(row["avg_relative"]), _interval(row["vs_none"])]
        cells += [_interval(row["vs_random"]), *(_interval(row["versus"][name]) for name in versus)]
        cells += [_cell(row["relevant_kept_last"]), _cell(row["relevant_kept_layers"])]
        cells.append(_cell(row["loyalty"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, benchmarks: list[str], rows: list[dict], versus: Sequence[str] = ()) -> None:
    bounds = lambda i: [None] * 3 if i is None else [i.difference, i.low, i.high]  # noqa: E731
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["model", "method", "target_r", "achieved_r", "seeds", *benchmarks, "mean", "seed_sd", "avg_relative"]
            + ["vs_none", "vs_none_low", "vs_none_high", "vs_random", "vs_random_low", "vs_random_high"]
            + [f"vs_{name}{end}" for name in versus for end in ("", "_low", "_high")]
            + ["relevant_kept_last", "relevant_kept_layers", "loyalty"]
            + [
                f"{name}_{vs}{end}"
                for name in benchmarks
                for vs in ("vs_none", "vs_random")
                for end in ("", "_low", "_high")
            ]
            + ["jobs"]
        )
        for row in rows:
            writer.writerow(
                [row["model"], row["method"], row["target_r"], row["achieved_r"], row["seeds"]]
                + [row["scores"].get(name) for name in benchmarks]
                + [row["mean"], row["seed_sd"], row["avg_relative"], *bounds(row["vs_none"]), *bounds(row["vs_random"])]
                + [v for name in versus for v in bounds(row["versus"][name])]
                + [row["relevant_kept_last"], row["relevant_kept_layers"], row["loyalty"]]
                + [v for name in benchmarks for i in row["per_benchmark"].get(name, (None, None)) for v in bounds(i)]
                + [";".join(row["jobs"])]
            )


def plot(path: Path, rows: list[dict]) -> dict[str, dict]:
    """Mean score against the achieved reserve ratio, one line per (model, method), each with its own colour and
    marker, with the 95% paired bootstrap interval of its difference to `none` as a bar on each point that has
    one; the unpruned model is the dashed reference line every method is read against. Returns what was drawn,
    per label: colour, marker, points and bars (None for the reference line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    lines: dict[tuple, list] = {}
    references = []
    for row in rows:
        if row["mean"] is None or row["achieved_r"] is None:
            continue
        if row["method"] == "none":
            references.append((row["model"], row["mean"]))
        else:
            lines.setdefault((row["model"], row["method"]), []).append((row["achieved_r"], row["mean"], row["vs_none"]))
    several_models = len({model for model, _ in lines} | {model for model, _ in references}) > 1
    colours = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]  # 18 colours, none alike
    markers = "osD^v<>pPX*hH8d"
    drawn: dict[str, dict] = {}
    for number, ((model, method), points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda point: point[0])
        label = f"{model} {method}" if several_models else method
        style = {"colour": colours[number % len(colours)], "marker": markers[number % len(markers)]}
        x, y = [p[0] for p in points], [p[1] for p in points]
        axes.plot(x, y, marker=style["marker"], color=style["colour"], label=label, markersize=5, linewidth=1.2)
        bars = [(r, mean, interval) for r, mean, interval in points if interval is not None]
        if bars:  # the interval of (method − none), drawn around the method's own point
            below = [interval.difference - interval.low for _, _, interval in bars]
            above = [interval.high - interval.difference for _, _, interval in bars]
            axes.errorbar(
                [b[0] for b in bars], [b[1] for b in bars], yerr=[below, above], fmt="none",
                ecolor=style["colour"], elinewidth=1, capsize=3,
            )  # fmt: skip
        drawn[label] = {**style, "points": len(points), "bars": len(bars)}
    for model, mean in references:
        label = f"{model} none" if several_models else "none"
        axes.axhline(mean, color="black", linestyle="--", linewidth=1, label=label)
        drawn[label] = None
    axes.set_xlabel("achieved reserve ratio r")
    axes.set_ylabel("mean score over benchmarks")
    if any(d and d["bars"] for d in drawn.values()):
        axes.set_title("bars: 95% paired bootstrap interval of the difference to none", fontsize=8)
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def report(directory: str | Path, versus: Sequence[str] = ()) -> str:
    directory = Path(directory)
    benchmarks, rows = build_rows(load_runs(directory), versus)
    text = markdown(benchmarks, rows, versus)
    (directory / "report.md").write_text(text)
    write_csv(directory / "report.csv", benchmarks, rows, versus)
    plot(directory / "report.png", rows)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a covipal.eval sweep (multirun) directory, or a single run's")
    parser.add_argument(
        "--versus",
        action="append",
        default=[],
        metavar="METHOD",
        help="also compare every row with this method at the same r (repeatable), e.g. --versus visionzip",
    )
    args = parser.parse_args(argv)
    try:
        print(report(args.directory, args.versus), end="")
    except CovipalError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"written: {Path(args.directory) / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
