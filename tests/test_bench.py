"""The efficiency harness: FLOP counts match torch's own counter, and one tiny run writes every figure with
ratios against `none` from the same run (no timing is asserted: this machine is noisy)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs
from torch.utils.flop_counter import FlopCounterMode

from covipal.efficiency.flops import llm_prefill_flops, transformer_layer_flops, vision_flops
from covipal.efficiency.memory import PeakSampler
from covipal.efficiency.run import median_interval
from covipal.models.families import family_named

ROOT = Path(__file__).resolve().parent.parent


def test_llm_flops_equal_torch_flop_counter(tiny_dir, processor):
    """Our count, with every query attending to all n keys (eager attention computes the full square, then masks),
    equals torch's counter on the eager model."""
    from pruning_helpers import pristine

    lm = pristine(tiny_dir, "eager").model.language_model
    config = lm.config
    inputs = make_inputs(processor, "image")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lm(input_ids=inputs["input_ids"])
    head_dim = config.hidden_size // config.num_attention_heads
    per_layer = transformer_layer_flops(
        n,
        config.hidden_size,
        config.intermediate_size,
        head_dim * config.num_attention_heads,
        head_dim * config.num_key_value_heads,
        n,
    )
    assert counter.get_total_flops() == config.num_hidden_layers * per_layer
    # the causal count charges n/2 keys on average, and scales with the tokens each layer takes in
    assert llm_prefill_flops(config, [n] * config.num_hidden_layers) < counter.get_total_flops()
    assert llm_prefill_flops(config, [n // 2] * 12) < llm_prefill_flops(config, [n] * 12) / 2


def test_vision_flops_equal_torch_flop_counter(tiny_dir):
    from pruning_helpers import pristine

    tower = pristine(tiny_dir, "eager").model.vision_tower
    config = tower.config
    pixels = torch.zeros(3, 3, config.image_size, config.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tower(pixels)
    work = family_named("llava_onevision").tower_work(config, [3])
    assert counter.get_total_flops() == vision_flops(work)


def test_peak_sampler_sees_an_allocation():
    with PeakSampler(interval=0.001) as sampler:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        block += 1
        del block
    assert sampler.above_start > 32 * 2**20


def run_bench_cli(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m covipal.bench *args` in `tmp_path`, offline, with its own empty cache."""
    env = dict(os.environ, COVIPAL_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "covipal.bench", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_median_interval_is_the_sign_tests():
    """The overhead's interval: the k-th smallest and largest of n ratios, k the largest whose sign-test coverage
    is at least 95%; none below 6 rounds; and it holds the true median of a skewed distribution that often."""
    assert median_interval([5.0, 1.0, 3.0, 2.0, 4.0]) is None  # 5 rounds: even min–max covers only 93.75%
    assert median_interval([6.0, 1.0, 3.0, 2.0, 5.0, 4.0]) == [1.0, 6.0]  # 96.9%
    assert median_interval([float(v) for v in range(15, 0, -1)]) == [4.0, 12.0]  # 96.5% (k = 5 would be 88.2%)
    for n in (9, 20, 31):
        low, high = median_interval([float(v) for v in range(1, n + 1)])
        k = int(low)
        assert high == n - k + 1
        coverage = [1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n for j in (k, k + 1)]
        assert coverage[0] >= 0.95 > coverage[1]
    generator = random.Random(0)
    trials = 2000
    held = 0
    for _ in range(trials):
        low, high = median_interval([generator.expovariate(1.0) for _ in range(15)])
        held += low <= math.log(2) <= high  # the exponential's median
    assert 0.95 <= held / trials <= 0.985  # 96.5% expected; ±0.8 points of sampling noise


@pytest.mark.slow
def test_tiny_bench_writes_every_figure(tmp_path):
    run_dir = tmp_path / "bench"
    args = [
        "model.pretrain.steps=0",
        "methods=[none,covipal,pdrop,visionzip,sparsevlm]",
        "ratios=[0.25]",
        "inputs=[{kind:image,size:[128,128]},{kind:video,frames:8}]",
        "repeats=2",  # two rounds: the paired overhead differs from a ratio of medians
        "warmup=0",
        "new_tokens=2",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_bench_cli(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dtype: float32 (model.dtype=float32)" in result.stdout  # the tiny model's own choice, said
    data = json.loads((run_dir / "bench.json").read_text())
    rows = {(r["input"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {
        (i, m) for i in ("image 128x128", "video 8f") for m in ("none", "covipal", "pdrop", "visionzip", "sparsevlm")
    }
    for (_, method), row in rows.items():
        if method == "sparsevlm":  # each pruning layer sees every token: r = 0.25 is out of reach on 4 layers
            assert "pruner.reserve_ratio>=" in row["infeasible"]
            continue
        n = row["n_visual"]
        if method in ("none", "covipal", "visionzip"):
            want = n if method == "none" else int(0.25 * n)
            assert row["layer_visual_tokens"] == [want] * 4
        assert row["memory"]["peak_bytes"] >= 0
        assert row["flops"]["vision"] > 0 and row["flops"]["llm"] > 0
        ratios = row["vs_none"]
        if method == "none":
            assert ratios["prefill_speedup"] == 1.0 and ratios["ideal_flop_speedup"] == 1.0
        else:
            assert ratios["ideal_flop_speedup"] > 1.0 or method == "covipal"  # the tiny PPM outweighs a 4-layer LLM
            assert ratios["kv_ratio"] < 0.6
    covipal = rows["image 128x128", "covipal"]
    paired = [a / b - 1 for a, b in zip(covipal["prefill_s"]["values"], covipal["bare_s"]["values"])]
    assert len(paired) == covipal["prefill_s"]["n"] and covipal["framework_overhead"] == statistics.median(paired)
    assert covipal["framework_overhead_range"] == [min(paired), max(paired)]
    assert covipal["framework_overhead_interval"] is None  # two rounds are too few for a 95% interval
    text = (run_dir / "bench.md").read_text()
    assert text.count("| covipal | 0.25 |") == 2 and "infeasible" in text
    assert (run_dir / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "given, named",
    [
        (["video 32f"], "bench input 'video 32f' is not a mapping"),
        ([{"kind": "video", "frames": 0}], "frames=0 must be a positive integer"),
        ([{"kind": "image", "size": [64]}], "size=[64] must be [height, width]"),
        ({"kind": "audio"}, "kind='audio'"),
    ],
)
def test_bad_bench_input_is_one_line_before_the_model_loads(given, named):
    from omegaconf import OmegaConf

    from covipal.efficiency.run import bench_inputs
    from covipal.errors import CovipalError

    cfg = OmegaConf.create({"inputs": given, "input_sets": {}})
    with pytest.raises(CovipalError, match=re.escape(named)) as error:
        bench_inputs(cfg, "")
    assert "\n" not in str(error.value) and "inputs=[{kind:" in str(error.value)


def test_bad_bench_input_through_the_cli(tmp_path):
    result = run_bench_cli(tmp_path, ["inputs=[video 32f]", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: bench input 'video 32f' is not a mapping; "
        + "e.g. inputs=[{kind:image,size:[768,768]},{kind:video,frames:32}]"
    ]
    assert not (tmp_path / "cache").exists()  # refused before the tiny model is built


@pytest.mark.slow
@pytest.mark.parametrize(
    "shapes, extra",
    [
        ("qwen2_5_vl_7b_shapes", ["model.spec.window_size=32", "model.spec.fullatt_blocks=[1]"]),
        (
            "qwen3_vl_8b_shapes",
            ["model.spec.position_embeddings=64", "model.spec.deepstack_blocks=[0,1]", "model.spec.min_pixels=256"],
        ),
    ],
)
def test_bench_runs_on_qwen_shapes(tmp_path, shapes, extra):
    """`covipal.bench` on a small Qwen2.5-VL / Qwen3-VL built from a spec: every figure, budgets counted in merged
    tokens."""
    run_dir = tmp_path / "bench"
    small = (
        "model.spec.text_layers=4 model.spec.text_hidden=64 model.spec.text_intermediate=128 model.spec.text_heads=4 "
        "model.spec.text_kv_heads=2 model.spec.mrope_section=[2,3,3] model.spec.vision_depth=2 "
        "model.spec.vision_hidden=32 model.spec.vision_intermediate=64 model.spec.vision_heads=4 "
        "model.spec.patch_size=8 model.spec.max_pixels=16384 model.spec.video_max_pixels=4096 model.ppm.hidden_size=32 "
        "model.ppm.intermediate_size=64 model.ppm.num_layers=1 model.ppm.num_heads=2 model.ppm.num_kv_heads=1 "
        "model.layer_plan.fastv_K=2 model.layer_plan.vitcop=[1,3] model.dtype=float32"
    ).split()
    args = [
        f"model={shapes}",
        *small,
        *extra,
        "methods=[none,covipal,fastv,visionzip,vitcop]",
        "ratios=[0.5]",
        "inputs=[{kind:image,size:[64,96]},{kind:video,frames:8}]",
        "repeats=1",
        "warmup=0",
        "new_tokens=2",
        "memory=false",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_bench_cli(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["input"], r["method"]): r for r in json.loads((run_dir / "bench.json").read_text())["rows"]}
    assert set(rows) == {
        (i, m) for i in ("image 64x96", "video 8f") for m in ("none", "covipal", "fastv", "visionzip", "vitcop")
    }
    for (_, method), row in rows.items():
        assert row["flops"]["vision"] > 0 and row["prefill_s"]["median"] > 0
        if method in ("covipal", "visionzip"):
            assert row["layer_visual_tokens"] == [row["n_visual"] // 2] * 4
    assert rows["image 64x96", "none"]["n_visual"] == 24  # 8 x 12 patches, merged 2 x 2
