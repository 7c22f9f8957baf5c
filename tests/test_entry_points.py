"""Configs compose, the eval entry point runs and sweeps on the tiny default, and bad input ends in one line."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from covipal import api
from covipal.cli import group_options
from covipal.errors import CovipalError
from covipal.inference import generate_answers
from covipal.pruning.fastv import fastv_keep_fraction
from covipal.tiny_world.export import benchmark_samples

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    env = dict(os.environ, COVIPAL_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# The CLI is exercised on the untrained tiny model (pretrain.steps=0); pretraining has its own tests. The tiny
# world's benchmarks are written with 8 questions each (into the module's cache).
UNTRAINED = "model.pretrain.steps=0"
SMALL_BENCHMARKS = "benchmark.tiny_world_rows=8"


def run_eval(args, env, cwd):
    chosen = any((a.startswith("model=") and a != "model=tiny") or a.startswith("model.pretrain.") for a in args)
    untrained = [] if chosen else [UNTRAINED]
    return subprocess.run(
        [sys.executable, "-m", "covipal.eval", *args, *untrained, SMALL_BENCHMARKS],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("pruner", group_options("pruner"))
def test_every_model_and_pruner_config_composes(model, pruner):
    cfg = api.compose("eval", [f"model={model}", f"pruner={pruner}"])
    pruners = ("covipal.pruning.", "covipal.tiny_world.oracle.")  # the oracle lives with the ground truth it reads
    assert cfg.model._target_.startswith("covipal.") and cfg.pruner._target_.startswith(pruners)
    assert 0 < cfg.pruner.reserve_ratio <= 1
    plan = cfg.model.layer_plan  # every model says where layer-indexed methods act on it
    if pruner == "fastv":
        assert cfg.pruner.K == plan.fastv_K
    assert api.compose("train", [f"model={model}"]).stage1.guidance_layer == plan.guidance


@pytest.mark.parametrize("pruner", ["none", "fastv", "covipal"])
def test_python_api_builds_what_the_cli_builds(pruner, monkeypatch, tmp_path):
    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path))
    extra = ["classifier=random"] if pruner == "covipal" else []
    loaded, built = api.load("tiny", pruner, UNTRAINED, "pruner.reserve_ratio=0.5", *extra)
    samples = benchmark_samples("TinyWorld_MCQ", 1)
    (answer,) = generate_answers(loaded, built, samples, max_new_tokens=3, progress=False)
    layers = loaded.model.config.text_config.num_hidden_layers
    expected = {"none": 1.0, "covipal": 0.5, "fastv": None}[pruner]
    if expected is None:
        assert built.K == loaded.layer_plan["fastv_K"] == 1  # the tiny model's layer plan, not FastV's usual 2
        keep = int(fastv_keep_fraction(0.5, layers, built.K) * answer.n_visual)
        expected = (built.K * answer.n_visual + (layers - built.K) * keep) / layers / answer.n_visual
    assert answer.reserve_ratio == pytest.approx(expected)


def test_eval_runs_and_writes_results(cache_env, tmp_path):
    args = ["pruner=fastv", "pruner.reserve_ratio=0.25", "num_samples=8", f"hydra.run.dir={tmp_path}/run"]
    result = run_eval(args, cache_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["benchmarks"]
    assert set(metrics) == {"TinyWorld_MCQ", "TinyWorld_YN", "TinyWorld_VQA", "TinyWorld_Video_MCQ"}
    for result_ in metrics.values():
        assert result_["questions"] == result_["questions_timed"] == 8 and 0 <= result_["score"] <= 100
        assert Path(result_["predictions"]).is_file()
        # K=1 of the tiny model's 4 layers at r=0.25 keeps a fraction 0 after layer 1, i.e. the one visual token
        # every budget keeps: r = 0.25 + 3/(4·n_v) (n_v = 336 per image, 129 per video)
        assert 0.25 <= result_["reserve_ratio_achieved"] <= 0.25 + 3 / (4 * 129) + 1e-9
        assert len(result_["visual_tokens_per_layer"]) == 4
    assert "TinyWorld_MCQ" in result.stdout


def test_eval_multirun_sweeps_into_self_describing_directories(cache_env, tmp_path):
    args = [
        "-m",
        "pruner=covipal,fastv",
        "pruner.reserve_ratio=0.5,0.25",
        "classifier=random",
        "num_samples=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    result = run_eval(args, cache_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 4
    assert any("pruner=covipal" in name and "reserve_ratio=0.25" in name for name in runs)
    ratios = {
        p.parent.name: json.loads(p.read_text())["benchmarks"]["TinyWorld_MCQ"]["reserve_ratio_achieved"]
        for p in (tmp_path / "sweep").glob("*/metrics.json")
    }
    for name, ratio in ratios.items():
        target = 0.5 if "reserve_ratio=0.5" in name else 0.25
        floor = 3 / (4 * 336) if "fastv" in name and target == 0.25 else 0.0  # one token stays (see above)
        assert ratio <= target + floor + 1e-9 and ratio > target - 0.1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["pruner=foo"], "unknown pruner 'foo'"),
        (["-m", "pruner=none,foo"], "unknown pruner 'foo'"),
        (["model=gpt"], "unknown model 'gpt'"),
        (["pruner=fastv", "pruner.reserve_ratio=1.5"], "pruner.reserve_ratio=1.5"),
        (["pruner=covipal", "pruner.reserve_ratio=0"], "pruner.reserve_ratio=0"),
        (["pruner=covipal"], "classifier=random"),
        (["pruner=fastv", "pruner.reserve_ratio=0.1"], "pruner.reserve_ratio>="),
        (["model=llava_ov"], "model.name_or_path="),
    ],
)
def test_bad_input_ends_in_one_line(args, needle, cache_env, tmp_path):
    result = run_eval([*args, f"hydra.run.dir={tmp_path}/run"], cache_env, tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr[-2000:]


def test_an_unreadable_benchmark_image_or_video_costs_its_row_only(cache_env, tmp_path):
    """One row with a broken embedded PNG and one with a broken video: each is reported in one line naming the
    benchmark, the row and the file, scored as wrong and counted; every other row is answered and scored."""
    from covipal.tiny_world.export import ensure_benchmarks

    root = tmp_path / "LMUData"
    ensure_benchmarks(root, ["TinyWorld_MCQ", "TinyWorld_Video_MCQ"], 8, progress=False)
    tsv = root / "TinyWorld_MCQ.tsv"
    table = pd.read_csv(tsv, sep="\t")
    table.loc[3, "image"] = base64.b64encode(b"not a png image " * 8).decode()  # > 64 characters: not a reference
    table.to_csv(tsv, sep="\t", index=False)
    stem = pd.read_csv(root / "TinyWorld_Video_MCQ.tsv", sep="\t").loc[5, "video"]
    video = root / "videos" / "TinyWorld_Video_MCQ" / f"{stem}.mp4"
    video.write_bytes(b"not a video")
    args = [
        f"data_root={root}",
        "benchmark.datasets={TinyWorld_MCQ: mcq, TinyWorld_Video_MCQ: video_mcq}",
        "num_samples=8",
        f"hydra.run.dir={tmp_path}/run",
    ]
    result = run_eval(args, cache_env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.split("\n") if "cannot read" in line]
    assert len(warnings) == 2, result.stderr[-3000:]
    image_line, video_line = sorted(warnings)  # MCQ before Video_MCQ
    assert image_line.startswith("warning: TinyWorld_MCQ row 3: cannot read ") and str(tsv) in image_line
    assert video_line.startswith("warning: TinyWorld_Video_MCQ row 5: cannot read ") and str(video) in video_line
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["benchmarks"]
    for name, row in (("TinyWorld_MCQ", "3"), ("TinyWorld_Video_MCQ", "5")):
        assert metrics[name]["failed_rows"] == 1 and metrics[name]["failed_row_indices"] == [row]
        assert metrics[name]["questions"] == 8 and metrics[name]["questions_timed"] == 7
        predictions = pd.read_csv(metrics[name]["predictions"], sep="\t", keep_default_na=False)
        assert len(predictions) == 8  # the other seven were answered by the model (questions_timed above)
        assert predictions.loc[predictions["index"].astype(str) == row, "prediction"].tolist() == [""]
        questions = [json.loads(line) for line in (tmp_path / "run" / "questions" / f"{name}.jsonl").open()]
        assert [q["index"] for q in questions if q["unreadable"]] == [row] and len(questions) == 8
        assert [q["hit"] for q in questions if q["index"] == row] == [0]
    assert "TinyWorld_MCQ: 1 of 8 rows unreadable, scored as wrong" in result.stdout


def test_api_reports_unknown_pruner_and_bad_ratio_as_user_errors():
    with pytest.raises(CovipalError, match="unknown pruner 'foo'"):
        api.compose("eval", ["pruner=foo"])
    with pytest.raises(CovipalError, match="outside"):
        api.build_pruner(api.compose("eval", ["pruner=fastv", "pruner.reserve_ratio=2"]))
    assert torch.get_num_threads() >= 1


def test_pretrain_entry_point_caches_what_model_tiny_loads(cache_env, tmp_path):
    recipe = ["model.pretrain.steps=3", "model.pretrain.batch_size=2", "eval_questions=4"]
    args = [sys.executable, "-m", "covipal.pretrain", *recipe, f"hydra.run.dir={tmp_path}/run"]
    result = subprocess.run(args, cwd=tmp_path, env=cache_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    checkpoint = Path(metrics["checkpoint"])
    assert checkpoint.parent == Path(cache_env["COVIPAL_CACHE"]) and (checkpoint / "pretrain_log.json").exists()
    assert 0 <= metrics["held_out_mcq"]["accuracy"] <= 1 and metrics["held_out_mcq"]["questions"] == 4
    # model=tiny with the same recipe now loads this checkpoint instead of training again
    rerun = run_eval(["model.pretrain.steps=3", "model.pretrain.batch_size=2", "num_samples=2",
                      f"hydra.run.dir={tmp_path}/eval"], cache_env, tmp_path)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "pretrain" not in rerun.stderr
