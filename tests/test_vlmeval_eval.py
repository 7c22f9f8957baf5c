"""`covipal.eval` through VLMEvalKit: our model answers through its inference function offline, its scores agree
with a recount from the prediction files, interrupted runs resume, every benchmark group composes, and a
2-process gloo run shards like one process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covipal import api
from covipal.cli import group_options
from covipal.errors import CovipalError
from covipal.evaluation.scoring import normalise

ROOT = Path(__file__).resolve().parent.parent
UNTRAINED = "model.pretrain.steps=0"
ROWS = 4
TINY_WORLD = ("TinyWorld_MCQ", "TinyWorld_YN", "TinyWorld_VQA", "TinyWorld_Video_MCQ")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("LMUData")


def config(data_root, output, *overrides):
    return api.compose(
        "eval",
        [
            UNTRAINED,
            f"num_samples={ROWS}",
            f"benchmark.tiny_world_rows={ROWS}",
            f"data_root={data_root}",
            f"output_dir={output}",
            *overrides,
        ],
    )


def evaluate(cfg):
    from covipal.eval import evaluate as run

    return run(cfg)


def predictions(output: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(output / f"tiny_{name}.tsv", sep="\t")


def test_tiny_model_answers_through_vlmeval_without_network(data_root, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    metrics = evaluate(config(data_root, tmp_path / "run", "pruner=random", "pruner.reserve_ratio=0.25"))
    assert no_network == []
    assert set(metrics["benchmarks"]) == set(TINY_WORLD)
    for name, result in metrics["benchmarks"].items():
        frame = predictions(tmp_path / "run", name)
        assert len(frame) == ROWS and frame["prediction"].notna().all()
        assert result["questions"] == result["questions_timed"] == ROWS
        assert result["reserve_ratio_achieved"] == pytest.approx(0.25, abs=0.01)
        assert len(result["visual_tokens_per_layer"]) == 4 and result["prefill_seconds_per_sample"] > 0
        assert result["pruner_seconds_per_sample"] > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["benchmarks"].keys() == metrics["benchmarks"].keys()


def test_tiny_qwen_reads_the_tiny_worlds_ground_truth_in_its_own_layout(data_root, tmp_path, monkeypatch):
    """`model=tiny_qwen pruner=oracle`: the benchmarks gain the ground truth in Qwen's tokens, and the oracle keeps
    every relevant token of each image and video question at r = 0.5 (a budget of 32 of 64 tokens covers them)."""
    from covipal.tiny_world.export import oracle_path

    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    cfg = config(data_root, tmp_path / "run", "model=tiny_qwen", "pruner=oracle", "pruner.reserve_ratio=0.5")
    metrics = evaluate(cfg)
    assert metrics["model"] == "tiny_qwen" and set(metrics["benchmarks"]) == set(TINY_WORLD)
    for name, result in metrics["benchmarks"].items():
        assert result["relevant_kept_mean_over_layers"] == 1.0, name
        assert result["visual_tokens_per_layer"] == [32] * 4, name  # of Qwen's 64 merged tokens
        written = list(data_root.glob(f"{name}_oracle_qwen2_5_vl_*.jsonl"))
        assert len(written) == 1 and oracle_path(data_root, name).is_file()
        assert {json.loads(line)["visual_tokens"] for line in written[0].read_text().splitlines()} == {64}


def scripted_answer(message, dataset=None) -> str:
    """A deterministic mix of right and wrong answers in each benchmark's format (no model needed)."""
    text = " ".join(item["value"] for item in message if item["type"] == "text")
    pick = int(hashlib.sha1(text.encode()).hexdigest(), 16)
    if "letter" in text:
        return "ABCD"[pick % 4]
    if dataset == "TinyWorld_YN":
        return ("yes", "no")[pick % 2]
    return ("red", "one", "top left", "circle")[pick % 4]


def recount(frame: pd.DataFrame, name: str) -> float:
    if name.endswith("MCQ"):
        letters = [re.findall(r"\b([A-D])\b", str(p)) for p in frame["prediction"]]
        hits = [bool(found) and found[0] == answer for found, answer in zip(letters, frame["answer"])]
    else:
        hits = [normalise(str(p)) == normalise(str(a)) for p, a in zip(frame["prediction"], frame["answer"])]
    return 100 * sum(hits) / len(hits)


def test_scores_match_a_recount_from_the_prediction_files(data_root, tmp_path, monkeypatch, no_network):
    from covipal.evaluation.vlmevalkit.model import PrunedVLM

    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        PrunedVLM, "generate_inner", lambda self, message, dataset=None: scripted_answer(message, dataset)
    )
    rows = 24
    cfg = config(data_root, tmp_path / "run", f"num_samples={rows}", f"benchmark.tiny_world_rows={rows}")
    metrics = evaluate(cfg)
    scores = {name: result["score"] for name, result in metrics["benchmarks"].items()}
    assert 0 < min(scores.values()) and max(scores.values()) < 100  # a mix, so a wrong scorer would show
    for name, score in scores.items():
        assert score == pytest.approx(recount(predictions(tmp_path / "run", name), name)), name


def test_a_rerun_reuses_finished_predictions_and_redoes_missing_ones(data_root, tmp_path, monkeypatch):
    from covipal.evaluation.vlmevalkit.model import PrunedVLM

    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    cfg = config(data_root, tmp_path / "run", "benchmark.datasets={TinyWorld_MCQ: mcq}")
    first = evaluate(cfg)["benchmarks"]["TinyWorld_MCQ"]
    path = tmp_path / "run" / "tiny_TinyWorld_MCQ.tsv"
    frame = pd.read_csv(path, sep="\t")
    frame.iloc[:2].to_csv(path, sep="\t", index=False)  # as if interrupted after two answers
    calls = []
    answer = PrunedVLM.generate_inner
    monkeypatch.setattr(
        PrunedVLM, "generate_inner", lambda self, m, dataset=None: calls.append(1) or answer(self, m, dataset)
    )
    second = evaluate(cfg)["benchmarks"]["TinyWorld_MCQ"]
    assert len(calls) == ROWS - 2
    assert pd.read_csv(path, sep="\t")["prediction"].tolist() == frame["prediction"].tolist()
    assert second["score"] == first["score"] and second["questions_timed"] == ROWS


@pytest.mark.parametrize("benchmark", group_options("benchmark"))
def test_every_benchmark_group_composes(benchmark):
    cfg = api.compose("eval", [f"benchmark={benchmark}"])
    from covipal.eval import KINDS

    assert cfg.benchmark.datasets and set(cfg.benchmark.datasets.values()) <= set(KINDS)
    assert cfg.benchmark.judge == "exact_matching"


def test_a_paper_benchmark_without_its_data_stops_naming_the_file(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    cfg = config(tmp_path / "empty", tmp_path / "run", "benchmark=image_paper")
    with pytest.raises(CovipalError, match=r"GQA_TestDev_Balanced\.tsv is missing \(data root .*empty\)"):
        evaluate(cfg)


@pytest.mark.slow
def test_two_gloo_processes_answer_what_one_process_answers(data_root, tmp_path):
    env = dict(os.environ, COVIPAL_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [
        UNTRAINED,
        "num_samples=6",
        "benchmark.tiny_world_rows=6",
        f"data_root={data_root}",
        "benchmark.datasets={TinyWorld_MCQ: mcq, TinyWorld_Video_MCQ: video_mcq}",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "covipal.eval", *args, f"hydra.run.dir={tmp_path}/one"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    sharded = subprocess.run(
        [*torchrun, "-m", "covipal.eval", *args, f"hydra.run.dir={tmp_path}/two"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    for name in ("TinyWorld_MCQ", "TinyWorld_Video_MCQ"):
        one, two = predictions(tmp_path / "one", name), predictions(tmp_path / "two", name)
        assert one["index"].tolist() == two["index"].tolist() == list(range(6))
        assert one["prediction"].tolist() == two["prediction"].tolist()
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["benchmarks"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["benchmarks"]
    assert {n: r["score"] for n, r in one.items()} == {n: r["score"] for n, r in two.items()}
    assert two["TinyWorld_MCQ"]["questions_timed"] == 6  # both ranks' statistics


def test_report_builds_the_table_from_a_real_sweep(data_root, tmp_path, monkeypatch):
    from covipal import eval as entry
    from covipal.evaluation.vlmevalkit.model import PrunedVLM
    from covipal.report import main as report_main

    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    # answers that differ with the budget, so the table has something to tell apart
    monkeypatch.setattr(
        PrunedVLM,
        "generate_inner",
        lambda self, message, dataset=None: scripted_answer(
            [*message, {"type": "text", "value": str(self.pruner.reserve_ratio)}], dataset
        ),
    )
    sweep = tmp_path / "sweep"
    argv = [
        "covipal.eval",
        "-m",
        "pruner=none,random",
        "pruner.reserve_ratio=0.5,0.25",
        "seed=0,1",
        UNTRAINED,
        "num_samples=16",
        "benchmark.tiny_world_rows=16",
        f"data_root={data_root}",
        "benchmark.datasets={TinyWorld_MCQ: mcq, TinyWorld_YN: yes_no}",
        f"hydra.sweep.dir={sweep}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    entry.main()
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert len(jobs) == 8
    report_main([str(sweep)])
    table = pd.read_csv(sweep / "report.csv")
    assert table[["method", "target_r", "seeds"]].values.tolist() == [
        ["none", 1.0, 2],
        ["random", 0.5, 2],
        ["random", 0.25, 2],
    ]
    metrics = [json.loads(p.read_text()) for p in jobs]
    none = next(m for m in metrics if m["method"] == "none")["benchmarks"]
    for row in table.itertuples():
        if row.method == "none":
            assert row.avg_relative == pytest.approx(100) and row.loyalty == pytest.approx(100)
            continue
        seeds = [m for m in metrics if m["method"] == "random" and m["pruner"]["reserve_ratio"] == row.target_r]
        assert sorted(m["seed"] for m in seeds) == [0, 1]
        scores = {n: sum(m["benchmarks"][n]["score"] for m in seeds) / 2 for n in seeds[0]["benchmarks"]}
        assert row.TinyWorld_MCQ == pytest.approx(scores["TinyWorld_MCQ"])
        expected = sum(100 * scores[n] / none[n]["score"] for n in scores) / len(scores)
        assert row.avg_relative == pytest.approx(expected)
        assert row.vs_none == pytest.approx(row.mean - table.loc[0, "mean"])  # paired over the same questions
        assert row.vs_none_low <= row.vs_none <= row.vs_none_high and 0 <= row.loyalty <= 100
    assert (sweep / "report.png").stat().st_size > 1000 and "| none |" in (sweep / "report.md").read_text()


def test_the_sweep_plot_tells_every_method_apart_and_reads_them_against_none(tmp_path):
    from covipal.evaluation.intervals import Interval
    from covipal.report import plot

    methods = ["covipal", "stage1", "fastv", "pdrop", "pdrop*", "sparsevlm", "visionzip", "vitcop", "random", "pool"]
    methods += ["oracle"]

    def row(method, r, interval=True):
        mean = 90.0 if method == "none" else 50.0 + 10 * r
        difference = Interval(mean - 90.0, mean - 93.0, mean - 88.0) if interval and method != "none" else None
        return {"model": "tiny", "method": method, "achieved_r": r, "mean": mean, "vs_none": difference}

    rows = [row("none", 1.0)] + [row(m, r, interval=m != "oracle") for m in methods for r in (0.5, 0.25)]
    drawn = plot(tmp_path / "report.png", rows)
    assert drawn.pop("none") is None  # the reference line, not a point
    assert sorted(drawn) == sorted(methods)
    assert len({str(d["colour"]) for d in drawn.values()}) == len(methods)
    assert len({d["marker"] for d in drawn.values()}) == len(methods)
    assert all(d["points"] == 2 for d in drawn.values())
    assert drawn["oracle"]["bars"] == 0 and all(d["bars"] == 2 for m, d in drawn.items() if m != "oracle")
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_report_groups_the_seeds_of_a_seeded_adapter_or_classifier_as_one_method():
    from covipal.report import group_key

    def run(seed, **extra):
        return {
            "model": "tiny",
            "method": "pdrop",
            "label": "pdrop_star",
            "seed": seed,
            "pruner": {"name": "pdrop", "reserve_ratio": 0.25, "seed": seed},
            **extra,
        }

    seeded = [run(s, adapter=f"/runs/s{s}/final") for s in (0, 1, 2)]
    assert len({group_key(r) for r in seeded}) == 1
    assert group_key(run(0)) != group_key(seeded[0])  # with and without an adapter stay apart
    assert group_key(run(0, pruner={"name": "pdrop", "reserve_ratio": 0.5})) != group_key(run(0))


def test_the_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from covipal.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition == "gpu"


@pytest.mark.parametrize("size", [(128, 128), (64, 128), (128, 64), (64, 64), (100, 37)])
def test_heatmap_layout_accounts_for_every_visual_token(sdpa_model, processor, size):
    from PIL import Image

    from covipal.evaluation.heatmap import kept_token_heatmap
    from covipal.models.families import family_of

    height, width = size
    image = Image.new("RGB", (width, height), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    n_visual = int((inputs["input_ids"] == sdpa_model.config.image_token_id).sum())
    panels = family_of(sdpa_model).image_token_panels(sdpa_model, processor, height, width)
    (_, side, _, _), high = panels[0], panels[1:]
    assert sum(rows * stride for _, rows, _, stride in panels) == n_visual
    if high:  # the high-resolution grid keeps the image's aspect (unpadding removes the padding)
        _, rows, columns, stride = high[0]
        assert stride == columns + 1 and abs(rows / columns - height / width) < 0.35
    kept = np.zeros(n_visual, dtype=bool)
    kept[: side * side] = True  # base view kept, high resolution pruned
    sheet = np.asarray(kept_token_heatmap(sdpa_model, processor, image, kept))
    middle = sheet[sheet.shape[0] // 2, :, 0]  # red channel along the middle row: kept panel, gap, pruned panel
    assert middle[2] == 200 and (not high or middle[-3] == 50)


def test_models_are_registered_in_vlmeval_and_answer_its_messages(tmp_path, monkeypatch, no_network):
    from PIL import Image
    from vlmeval.config import supported_VLM

    from covipal.evaluation.vlmevalkit.model import register

    monkeypatch.setenv("COVIPAL_CACHE", str(tmp_path / "cache"))
    assert "covipal" in supported_VLM
    register("covipal_test", UNTRAINED, "pruner=random", "pruner.reserve_ratio=0.5")
    model = supported_VLM.pop("covipal_test")()
    Image.new("RGB", (128, 128), (0, 200, 0)).save(tmp_path / "green.png")
    answer = model.generate(
        [{"type": "image", "value": str(tmp_path / "green.png")}, {"type": "text", "value": "what colour?"}]
    )
    assert isinstance(answer, str) and model.session.record.reserve_ratio.tolist() == [0.5]
    model.__exit__(None, None, None)


def test_the_local_video_set_prompts_models_without_their_own(data_root):
    from covipal.evaluation.vlmevalkit.datasets import LocalVideoMCQ, open_benchmark, register_local_sets
    from covipal.evaluation.vlmevalkit.runner import vlmeval_environment
    from covipal.tiny_world.export import ensure_benchmarks

    root = vlmeval_environment(data_root)
    ensure_benchmarks(root, ["TinyWorld_Video_MCQ"], ROWS, progress=False)
    register_local_sets(yes_no=[], video_mcq=["TinyWorld_Video_MCQ"])
    dataset = open_benchmark("TinyWorld_Video_MCQ", "video_mcq", nframe=4)
    as_video = dataset.build_prompt(0, video_llm=True)
    assert [item["type"] for item in as_video] == ["video", "text"] and Path(as_video[0]["value"]).is_file()
    text = as_video[1]["value"]
    assert text.startswith(dataset.data.iloc[0]["question"]) and "\nA. " in text
    assert text.endswith(LocalVideoMCQ.INSTRUCTION)
    as_frames = dataset.build_prompt(0, video_llm=False)
    assert [item["type"] for item in as_frames] == ["image"] * 4 + ["text"] and as_frames[-1]["value"] == text


def test_a_run_directory_refuses_results_of_another_configuration(tmp_path):
    """Resume reuses predictions: a job whose excluded path (adapter, classifier) differs must not reuse them."""
    from covipal.eval import claim_output_dir

    first = api.compose("eval", ["pruner=pdrop", "adapter=/runs/a/final"])
    claim_output_dir(tmp_path, first, write=True)
    claim_output_dir(tmp_path, api.compose("eval", ["pruner=pdrop", "adapter=/runs/a/final"]), write=True)  # same
    with pytest.raises(CovipalError, match=r"adapter differ.*label=") as error:
        claim_output_dir(tmp_path, api.compose("eval", ["pruner=pdrop", "adapter=/runs/b/final"]), write=True)
    assert "\n" not in str(error.value)
    with pytest.raises(CovipalError, match="pruner differ"):
        claim_output_dir(
            tmp_path,
            api.compose("eval", ["pruner=pdrop", "adapter=/runs/a/final", "pruner.reserve_ratio=0.25"]),
            write=True,
        )


def test_importing_vlmevalkit_leaves_gradients_on():
    """vlmeval.vlm switches gradients off for the whole process when imported; ours restores them."""
    import covipal.evaluation.vlmevalkit.model  # noqa: F401

    assert torch.is_grad_enabled()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_answers_vlmevalkit_messages_with_a_pruner(tmp_path, monkeypatch, no_network, family):
    """`model=qwen2_5_vl` / `model=qwen3_vl` pointed at a local copy, registered in VLMEvalKit: it answers an image
    message through its own chat template, pruned at the budget asked for."""
    from PIL import Image
    from qwen_helpers import save_tiny_qwen
    from vlmeval.config import supported_VLM

    from covipal.evaluation.vlmevalkit.model import register

    directory = save_tiny_qwen(tmp_path / "qwen", family=family)
    register(
        "covipal_qwen_test",
        f"model={family}",
        f"model.name_or_path={directory}",
        "model.dtype=float32",
        "model.device=cpu",
        "model.attn_implementation=sdpa",
        "pruner=random",
        "pruner.reserve_ratio=0.5",
    )
    model = supported_VLM.pop("covipal_qwen_test")()
    Image.new("RGB", (96, 64), (0, 200, 0)).save(tmp_path / "green.png")
    answer = model.generate(
        [{"type": "image", "value": str(tmp_path / "green.png")}, {"type": "text", "value": "what colour?"}]
    )
    record = model.session.record
    assert isinstance(answer, str) and int(record.n_visual[0]) == 24
    assert record.layer_visual_tokens[:, 0].tolist() == [12] * 4
    model.__exit__(None, None, None)
