"""`python -m covipal.train`: configs compose, stage 1 runs on the tiny default and its PPM plugs into eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covipal import api
from covipal.cli import group_options
from covipal.models.ppm import PPMClassifier, PPMConfig

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "model.pretrain.steps=0",
    "data.sources.images.images=12",
    "data.sources.videos.videos=4",
    "train.batch_size=4",
    "train.save_every=2",
    "logger.wandb=disabled",
]


def run(module: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def evaluate(args: list[str], env: dict, tmp_path: Path) -> dict:
    """`covipal.eval` of 4 questions per benchmark with `args` on the untrained tiny model; its metrics.json."""
    small = ["model.pretrain.steps=0", "num_samples=4", f"hydra.run.dir={tmp_path / 'eval'}"]
    result = run("covipal.eval", [*args, *small], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "eval" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ, COVIPAL_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_configs_compose(experiment):
    cfg = api.compose("train", [f"experiment={experiment}"])
    assert cfg.stage in (1, 2, "lora")
    assert cfg.model._target_.startswith("covipal.")
    assert all(node._target_.startswith("covipal.data.") for node in cfg.data.sources.values())


def test_paper_stage1_settings():
    cfg = api.compose("train", ["experiment=stage1_llava_ov"])
    assert (cfg.stage1.lr, cfg.stage1.guidance_layer, cfg.stage1.query_rows) == (1e-5, 16, "literal")
    assert (cfg.train.precision, cfg.train.epochs, cfg.data.max_length) == ("bf16", 1, 3000)
    assert cfg.data.vision_aspect_ratio == "anyres_max_2"
    assert cfg.data.sources.llava_next.fraction == 0.03
    assert cfg.model.name_or_path.endswith("llava-onevision-qwen2-7b-ov-chat-hf")


@pytest.mark.slow
def test_stage1_runs_resumes_and_feeds_eval(env, tmp_path):
    run_dir = tmp_path / "run"
    result = run("covipal.train", ["stage=1", "train.max_steps=3", f"hydra.run.dir={run_dir}", *SMALL], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    # Continue the same run to 4 steps from its newest checkpoint.
    args = ["stage=1", "train.max_steps=4", f"resume={run_dir}", f"hydra.run.dir={run_dir}", *SMALL]
    result = run("covipal.train", args, env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 4
    evaluate(["pruner=covipal", f"classifier={run_dir / 'final'}"], env, tmp_path)


@pytest.mark.slow
def test_pdrop_star_trains_lora_and_its_adapter_feeds_eval(env, tmp_path):
    run_dir = tmp_path / "lora"
    args = ["stage=lora", "train.max_steps=2", "lora.rank=4", f"hydra.run.dir={run_dir}", *SMALL]
    result = run("covipal.train", args, env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA " in result.stdout and "trainable parameters" in result.stdout
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["reserve_ratio"] < 0.6 for r in rows)
    metrics = evaluate(["pruner=pdrop", f"adapter={run_dir / 'final'}"], env, tmp_path)
    assert metrics["method"] == "pdrop*" and metrics["adapter"] == str(run_dir / "final")


def test_paper_pdrop_star_settings():
    cfg = api.compose("train", ["experiment=pdrop_star_llava_ov"])
    assert cfg.stage == "lora" and cfg.model.name == "llava_ov"
    assert cfg.pruner._target_.endswith("PyramidDropPruner") and cfg.pruner.reserve_ratio == 0.25
    assert list(cfg.pruner.layers) == [2, 8, 16] and cfg.lora.rank == 32
    assert cfg.data.sources.llava_next.fraction == 0.10 and cfg.train.precision == "bf16"


@pytest.mark.parametrize(
    "args, message",
    [
        (["stage=3"], "stage=3 is not available"),
        (["stage=lora", "pruner.layers=[3]"], "use pruner.layers=[0, 1, 2]"),
        (["stage1.query_rows=middle"], "query_rows='middle'"),
        (["stage1.guidance_layer=40"], "guidance_layer=40"),
        (["train.batch_size=100"], "fewer than train.batch_size=100"),
        (["resume=/nonexistent/run"], "resume=/nonexistent/run: no checkpoint"),
        (["data=llava_next"], "data.sources.llava_next.path is not set"),
        (["data=llava_next", "data.sources.llava_next.path=/no/such.json"], "data file /no/such.json does not exist"),
        (["stage1.init=WIDTH32"], "trained for LLM width 32 but this model's width is 96"),
        (["stage=2", "stage2.k=-1"], "stage2.k=-1 is negative"),
    ],
)
def test_bad_input_ends_in_one_line(env, tmp_path, args, message):
    if "stage1.init=WIDTH32" in args:
        PPMClassifier(
            PPMConfig(input_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
        ).save_pretrained(tmp_path / "ppm32")
        args = [f"stage1.init={tmp_path / 'ppm32'}"]
    small = [a for a in SMALL if not a.startswith("data.")] if "data=llava_next" in args else SMALL
    result = run("covipal.train", [*small, f"hydra.run.dir={tmp_path}", *args], env, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr


def test_paper_stage2_settings():
    for name, model in (("stage2_llava_ov", "llava_ov"), ("stage2_llava_video", "llava_video")):
        cfg = api.compose("train", [f"experiment={name}"])
        assert cfg.stage == 2 and cfg.model.name == model
        assert (cfg.stage2.lr, cfg.stage2.k, cfg.stage2.reserve_ratio) == (5e-6, 0.01, 0.25)
        assert cfg.train.precision == "bf16" and cfg.stage2.regularizer == "separation"
    video = api.compose("train", ["experiment=stage2_llava_video"])
    assert (video.data.sources.academic.fraction, video.data.sources.academic.frames) == (0.2, 8)


def test_a_training_set_of_unreadable_images_stops_in_one_line_naming_a_file(env, tmp_path):
    records = []
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a square"}]})  # fmt: skip
    (tmp_path / "next.json").write_text(json.dumps(records))
    small = [a for a in SMALL if not a.startswith("data.")]
    data = [
        "data=llava_next",
        f"data.sources.llava_next.path={tmp_path / 'next.json'}",
        "data.sources.llava_next.fraction=1",
    ]
    result = run(
        "covipal.train", [*small, *data, "train.progress=true", f"hydra.run.dir={tmp_path}/run"], env, tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.rstrip("\n").split("\n")[-1]  # "\n" only: a progress bar's "\r" would stay on this line
    assert last.startswith("error: none of the 4 samples of "), result.stderr[-2000:]
    assert f"the first, {tmp_path / '0.png'}: " in last or f"{tmp_path}/" in last.split("the first, ")[1]
