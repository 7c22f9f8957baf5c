"""Stage-1 training: only the PPM learns, the loss is finite and pinned, resume and two processes change nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tiny
from safetensors.torch import load_file
from workers.stage1_run import Crash
from workers.stage1_run import main as run_stage1

from covipal.training.loop import latest_checkpoint

WORKER = Path(__file__).parent / "workers" / "stage1_run.py"
PINNED_LOSSES = [0.22535142302513123, 0.11231263726949692]  # fixed seeds, generator 5, tokenizer 2, question rows, max


def ppm_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, **tolerance) -> None:
    wa, wb = ppm_weights(a), ppm_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], **tolerance)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(tiny_dir, data_cache, tmp_path_factory):
    """Two epochs of 4 steps (batch 4); the LLM is kept whole so its weights can be compared afterwards."""
    out = tmp_path_factory.mktemp("reference")
    model = load_tiny(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    final = run_stage1(str(tiny_dir), data_cache, str(out), max_steps=8, model=model, free=False)
    return out, final, model, before


def test_loss_is_finite_pinned_and_falls(reference):
    rows = metrics(reference[0])
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[4:]) < 0.9 * sum(losses[:4])  # the second pass over the same data fits it better
    assert losses[:2] == pytest.approx(PINNED_LOSSES, rel=1e-4)
    assert all(0 <= row["recall_at_r"] <= 1 for row in rows)


def test_only_the_ppm_learns(reference):
    out, final, model, before = reference
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(p.requires_grad for p in model.parameters())
    first = ppm_weights(out / "checkpoints" / "step-8" / "artifact")
    assert_same_weights(final, out / "checkpoints" / "step-8" / "artifact", rtol=0, atol=0)
    assert sorted(first) == sorted(ppm_weights(final))
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,loss")


def test_checkpoints_keep_the_newest_two_with_optimizer_state(reference):
    out = reference[0]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-7", "step-8"]
    state = out / "checkpoints" / "step-8" / "state"
    assert {"optimizer.bin", "scheduler.bin", "model.safetensors"} <= {p.name for p in state.iterdir()}
    assert latest_checkpoint(out) == out / "checkpoints" / "step-8"


def test_crash_then_resume_equals_uninterrupted(tiny_dir, data_cache, tmp_path):
    """Two epochs with gradient accumulation; the run dies after step 3 and is resumed from its checkpoint."""
    straight = run_stage1(str(tiny_dir), data_cache, str(tmp_path / "straight"), max_steps=4, grad_accum=2)
    with pytest.raises(Crash):
        run_stage1(str(tiny_dir), data_cache, str(tmp_path / "crashed"), max_steps=4, grad_accum=2, crash_after=3)
    assert latest_checkpoint(tmp_path / "crashed").name == "step-2"
    resumed = run_stage1(
        str(tiny_dir), data_cache, str(tmp_path / "crashed"), max_steps=4, grad_accum=2, resume=tmp_path / "crashed"
    )
    assert_same_weights(straight, resumed, rtol=0, atol=0)
    assert [row["step"] for row in metrics(tmp_path / "crashed")] == [1, 2, 3, 3, 4]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_dir, data_cache, tmp_path):
    """DDP over gloo with the global batch split in two gives the single-process weights. At lr 1e-2 (the other
    tests' 5e-2 lets Adam scale the all-reduce's summation-order noise on near-zero gradients to ~6e-6), a split
    that was not averaged would still be off by orders of magnitude more than the tolerance."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(WORKER.parent.parent)])}
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        result = subprocess.run(
            [*command, str(WORKER), str(tiny_dir), data_cache, str(out), "3", "1", "1e-2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = out / "final"
    # the all-reduce sums in another order; Adam (lr 5e-2) scales that noise up on weights whose gradient is ~0
    assert_same_weights(runs[1], runs[2], rtol=1e-4, atol=1e-6)
    shutil.rmtree(tmp_path, ignore_errors=True)
