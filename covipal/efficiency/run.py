"""The harness's loop: per input, the vision tower once, then every method (interleaved repeat by repeat, so
machine noise hits all alike), then memory (one fresh process per method on CPU), FLOPs and ratios against
`none` from the same run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from covipal.api import build_model
from covipal.efficiency.build import make_pruner
from covipal.efficiency.flops import decode_flops_per_token, llm_prefill_flops, ppm_flops, vision_flops
from covipal.efficiency.inputs import build_input, check_input, input_name
from covipal.efficiency.measure import bare_reference, encode, measure, prime
from covipal.efficiency.memory import measure_in_fresh_processes, one_memory_measurement
from covipal.errors import CovipalError
from covipal.models.families import family_of


def jobs(cfg: DictConfig) -> list[tuple[str, float]]:
    return [
        (m, 1.0) if m == "none" else (m, float(r)) for m in cfg.methods for r in ([1.0] if m == "none" else cfg.ratios)
    ]


def bench_inputs(cfg: DictConfig, model_name: str) -> list[dict]:
    """`inputs`, or the input set named after the model (the real models' set for any other)."""
    if cfg.inputs is not None:
        specs = OmegaConf.to_container(cfg.inputs, resolve=True)
    else:
        sets = OmegaConf.to_container(cfg.input_sets, resolve=True)
        specs = sets.get(model_name, sets["real"])
    if not isinstance(specs, list):
        specs = [specs]
    return [check_input(spec) for spec in specs]


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),  # per repeat, in round order
    }


def median_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """A distribution-free interval of the median (the sign test's): the k-th smallest and the k-th largest value,
    with k the largest for which the interval holds the true median with probability ≥ `level` whatever the
    values' distribution. None when there are too few values for any k (fewer than 6 at 95%)."""
    n = len(values)
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k), the chance that fewer than k values fall below the median
    while k < n // 2:
        wider = below + math.comb(n, k) / 2**n  # the same for k + 1
        if 1 - 2 * wider < level:
            break
        k, below = k + 1, wider
    ordered = sorted(values)
    return [ordered[k - 1], ordered[n - k]] if k else None


def run_bench(cfg: DictConfig, overrides: list[str], on_input=None) -> tuple[list[dict], object]:
    """Every method on every input; returns the result rows and the loaded model. `on_input(rows, loaded)` runs
    after each input (the entry point writes its files there, so a long run keeps what it has measured)."""
    given = bench_inputs(cfg, "") if cfg.inputs is not None else None  # checked before the model loads
    loaded = build_model(cfg)
    specs = given or bench_inputs(cfg, loaded.name)
    model = loaded.model
    torch.manual_seed(cfg.seed)
    rows: list[dict] = []
    for spec in specs:
        name = input_name(spec)
        encoded = encode(model, build_input(loaded, spec))  # timed once: the tower's cost is large and steady
        pruners, problems = {}, {}
        for method, ratio in jobs(cfg):
            try:
                pruner = make_pruner(cfg, method, ratio)
                pruner.setup(model)
                pruners[method, ratio] = pruner
            except CovipalError as error:
                problems[method, ratio] = str(error)
        scoring = {key: prime(model, pruner, encoded) for key, pruner in pruners.items()}
        samples = {key: [] for key in pruners}
        bare = {key: [] for key in pruners if key[0] == "covipal"}
        kept = {}
        rounds = cfg.warmup + cfg.repeats
        with tqdm(total=rounds * (len(pruners) + len(bare)), desc=name, disable=not cfg.progress) as bar:
            for round_index in range(rounds):
                counted = round_index >= cfg.warmup
                # the framework and its bare reference alternate which runs first, so that neither gains from
                # coming right after the other on the same shapes (round 0 runs the framework first: the bare
                # reference replays the tokens it kept)
                parts = ("framework", "bare") if round_index % 2 == 0 else ("bare", "framework")
                for key, pruner in pruners.items():  # interleaved: every method once per round
                    for part in parts if key in bare else ("framework",):
                        if part == "framework":
                            result = measure(model, pruner, encoded, cfg.new_tokens)
                            kept[key] = result.record
                            if counted:
                                samples[key].append(result)
                        else:
                            seconds = bare_reference(model, pruner, encoded, kept[key])
                            if counted:
                                bare[key].append(seconds)
                        bar.update()
        memory = {}
        if cfg.memory and next(model.parameters()).is_cuda:
            memory = {key: one_memory_measurement(loaded, encoded, p, cfg.new_tokens) for key, p in pruners.items()}
        elif cfg.memory:
            requests = [
                {
                    "overrides": overrides,
                    "input": spec,
                    "method": key[0],
                    "ratio": key[1],
                    "new_tokens": cfg.new_tokens,
                    "threads": torch.get_num_threads(),
                }
                for key in pruners
            ]
            if cfg.progress:
                print(f"{name}: peak memory, one fresh process per method ({len(requests)})", flush=True)
            memory = dict(zip(pruners, measure_in_fresh_processes(requests)))
        rows += input_rows(cfg, loaded, spec, name, encoded, pruners, samples, bare, scoring, memory, problems)
        if on_input is not None:
            on_input(rows, loaded)
    return rows, loaded


def input_rows(cfg, loaded, spec, name, encoded, pruners, samples, bare, scoring, memory, problems) -> list[dict]:
    config = loaded.model.config
    vocab = getattr(config, "real_vocab_size", config.text_config.vocab_size)
    rows = []
    for key, results in samples.items():
        method, ratio = key
        first = results[0]
        prefill = [r.prefill_seconds for r in results]
        decode = [r.new_tokens / r.decode_seconds for r in results if r.decode_seconds > 0]
        llm = llm_prefill_flops(config.text_config, first.layer_tokens)
        ppm = (
            ppm_flops(pruners[key].ppm.config, first.layer_tokens[0] + first.n_visual - first.layer_visual[0])
            if method == "covipal"
            else 0.0
        )
        context = first.layer_tokens[-1] + cfg.new_tokens // 2
        row = {
            "input": name,
            "kind": spec["kind"],
            "frames": spec.get("frames"),
            "n_visual": first.n_visual,
            "method": method,
            "ratio": ratio,
            "ratio_achieved": first.reserve_ratio,
            "layer_visual_tokens": first.layer_visual,
            "prefill_s": summary(prefill),
            "tower_s": encoded.tower_seconds,
            "tower_scoring_s": scoring.get(key, 0.0),
            "pruner_s": statistics.median(r.select_seconds for r in results),
            "decode_tok_s": summary(decode) if decode else None,
            "kv_bytes": first.kv_bytes,
            "flops": {
                "llm": llm,
                "vision": vision_flops(family_of(loaded.model).tower_work(config.vision_config, encoded.units)),
                "ppm": ppm,
                "decode_per_token": decode_flops_per_token(config.text_config, context, vocab),
            },
            "memory": memory.get(key),
        }
        if key in bare and bare[key]:
            row["bare_s"] = summary(bare[key])
            # paired by round (the two run back to back), so that the machine's drift between rounds cancels
            paired = [mine / reference - 1.0 for mine, reference in zip(prefill, bare[key])]
            row["framework_overhead"] = statistics.median(paired)
            row["framework_overhead_range"] = [min(paired), max(paired)]
            row["framework_overhead_interval"] = median_interval(paired)  # 95%; None below 6 rounds
        rows.append(row)
    for (method, ratio), problem in problems.items():
        rows.append(
            {
                "input": name,
                "kind": spec["kind"],
                "frames": spec.get("frames"),
                "method": method,
                "ratio": ratio,
                "infeasible": problem,
            }
        )
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups against `none` of the same input and run, and how close each comes to its FLOP saving."""
    base = next((r for r in rows if r["method"] == "none" and "prefill_s" in r), None)
    if base is None:
        return
    for row in rows:
        if "prefill_s" not in row:
            continue
        llm_speedup = base["prefill_s"]["median"] / row["prefill_s"]["median"]
        ideal = (base["flops"]["llm"]) / (row["flops"]["llm"] + row["flops"]["ppm"])
        full = base["prefill_s"]["median"] + base["tower_s"]
        mine = row["prefill_s"]["median"] + row["tower_s"] + row["tower_scoring_s"]
        row["vs_none"] = {
            "prefill_speedup": llm_speedup,
            "prefill_speedup_with_tower": full / mine,
            "ideal_flop_speedup": ideal,
            "measured_vs_ideal": llm_speedup / ideal,
            "kv_ratio": row["kv_bytes"] / base["kv_bytes"],
        }
        if row.get("decode_tok_s") and base.get("decode_tok_s"):
            row["vs_none"]["decode_speedup"] = row["decode_tok_s"]["median"] / base["decode_tok_s"]["median"]
        if (
            row.get("memory")
            and base.get("memory")
            and "peak_bytes" in row["memory"]
            and "peak_bytes" in base["memory"]
        ):
            row["vs_none"]["memory_ratio"] = row["memory"]["peak_bytes"] / max(base["memory"]["peak_bytes"], 1)


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
