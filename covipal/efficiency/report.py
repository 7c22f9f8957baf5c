"""The harness's outputs: bench.json (every figure), bench.md (the table) and bench.png (latency vs frames)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, digits=2, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def write_markdown(rows: list[dict], path: Path, meta: dict) -> Path:
    lines = [
        f"# Efficiency: {meta['model']} ({meta['dtype']}, {meta['device']}, {meta['threads']} threads)",
        "",
        f"Median of {meta['repeats']} interleaved repeats after {meta['warmup']} warm-up; ratios against `none` of "
        "the same input and run. Prefill = the LLM part from precomputed vision features (the tower, the same for "
        "every method, is timed once: `tower s`); `x none` adds the tower to both sides. `ideal` = LLM FLOPs of "
        "none / (LLM + PPM FLOPs) of the method; `meas/ideal` = how much of its FLOP saving a method turns into "
        "speed; `overhead` = CoViPAL's prefill over its bare reference run back to back, the median of the rounds' "
        "ratios, with its 95% interval (sign test, from 6 rounds on) and the ratios' range. Memory: peak above the "
        "pre-prefill level during prefill and decode.",
        "",
        "| input | method | r | prefill s (min–max) | speed-up | x none with tower | ideal | meas/ideal | "
        "decode tok/s | decode x | KV MB | mem MB | pruner s | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "infeasible" in row:
            lines.append(
                f"| {row['input']} | {row['method']} | {row['ratio']:.2f} | infeasible: "
                f"{row['infeasible'].split(';')[0]} |" + " |" * 10
            )
            continue
        ratios = row.get("vs_none", {})
        prefill = row["prefill_s"]
        memory = row.get("memory") or {}
        peak = memory.get("peak_bytes")
        decode = row.get("decode_tok_s") or {}
        lines.append(
            f"| {row['input']} | {row['method']} | {row['ratio']:.2f} | "
            f"{prefill['median']:.3f} ({prefill['min']:.3f}–{prefill['max']:.3f}) | "
            f"{_fmt(ratios.get('prefill_speedup'), 2, '×')} | "
            f"{_fmt(ratios.get('prefill_speedup_with_tower'), 2, '×')} | "
            f"{_fmt(ratios.get('ideal_flop_speedup'), 2, '×')} | {_fmt(ratios.get('measured_vs_ideal'))} | "
            f"{_fmt(decode.get('median'), 1)} | {_fmt(ratios.get('decode_speedup'), 2, '×')} | "
            f"{row['kv_bytes'] / 2**20:.1f} | {_fmt(None if peak is None else peak / 2**20, 0)} | "
            f"{row['pruner_s'] + row['tower_scoring_s']:.4f} | "
            f"{overhead(row)} |"
        )
    tower = {row["input"]: row["tower_s"] for row in rows if "tower_s" in row}
    lines += ["", "Vision tower per input (s): " + ", ".join(f"{k} {v:.3f}" for k, v in tower.items()), ""]
    path.write_text("\n".join(lines))
    return path


def overhead(row: dict) -> str:
    """The framework's overhead over its bare reference: the median of the rounds' ratios, its 95% interval where
    there are rounds enough for one, and the ratios' range."""
    if "framework_overhead" not in row:
        return "–"
    low, high = row["framework_overhead_range"]
    spread = f"range {100 * low:+.1f} to {100 * high:+.1f}"
    interval = row.get("framework_overhead_interval")
    if interval is not None:
        spread = f"95% CI {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}; {spread}"
    return f"{100 * row['framework_overhead']:+.1f}% ({spread})"


def write_plot(rows: list[dict], path: Path) -> Path | None:
    """Prefill latency (LLM part) against frames, one line per method and ratio (video inputs only)."""
    video = [r for r in rows if r.get("kind") == "video" and "prefill_s" in r]
    if not video:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["method"], r["ratio"]) for r in video}):
        points = sorted((r["frames"], r["prefill_s"]["median"]) for r in video if (r["method"], r["ratio"]) == key)
        label = key[0] if key[0] == "none" else f"{key[0]} r={key[1]:g}"
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xlabel("frames")
    axis.set_ylabel("prefill latency, LLM part (s)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_all(rows: list[dict], directory: Path, meta: dict) -> list[Path]:
    (directory / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    written = [directory / "bench.json", write_markdown(rows, directory / "bench.md", meta)]
    plot = write_plot(rows, directory / "bench.png")
    return written + ([plot] if plot else [])
