"""PDrop*: the shared loop trains LoRA adapters of the LLM while PyramidDrop prunes; only the adapters change, the
loss is the answer loss on the pruned sequence, and the saved adapter merges back for evaluation."""

from __future__ import annotations

import torch
from conftest import load_tiny

from covipal.data.conversation import TrainingCollator
from covipal.data.mixture import mixture
from covipal.models.adapters import merge_adapter, trainable_parameters
from covipal.pruning.none import NoPruner
from covipal.pruning.pdrop import PyramidDropPruner
from covipal.tiny_world.training_data import tiny_world_images
from covipal.training.loop import LoopConfig, train
from covipal.training.lora import LoRASettings, PrunedLoRATask, answer_starts

SETTINGS = LoRASettings(rank=4, alpha=8, dropout=0.0)


def batch_of(processor, tmp_path, size=4):
    data = mixture({"images": tiny_world_images(size, cache_dir=str(tmp_path / "cache"))})
    return TrainingCollator(processor, labels=True)([data[i] for i in range(size)]), data


def test_answer_starts_mark_the_token_before_each_answer():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7, -100], [-100, 3, -100, -100, -100, -100, -100, -100]])
    assert answer_starts(labels).nonzero().tolist() == [[0, 1], [0, 5], [1, 0]]


def test_a_pdrop_star_step_changes_only_lora_parameters(tiny_dir, processor, tmp_path):
    model = load_tiny(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = PrunedLoRATask(model, PyramidDropPruner(0.25, layers=[0, 4, 8]), SETTINGS)
    assert 0 < trainable_parameters(task.trainable) < sum(v.numel() for v in before.values()) // 10
    _, data = batch_of(processor, tmp_path)
    final = train(
        task,
        data,
        TrainingCollator(processor),
        LoopConfig(lr=1e-2, batch_size=4, max_steps=2, progress=False),
        tmp_path / "run",
    )
    state = task.trainable.state_dict()
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k
    }
    assert set(base) == set(before)
    assert all(torch.equal(base[k], before[k]) for k in before)  # every base weight untouched
    lora = [k for k in state if "lora_B" in k]
    assert lora and all("language_model" in k for k in lora)
    assert any(state[k].abs().sum() > 0 for k in lora)  # lora_B starts at zero; it moved
    assert (final / "adapter_model.safetensors").is_file()

    # the adapter merges back into a fresh model and gives the trained model's outputs
    batch, _ = batch_of(processor, tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    merged = merge_adapter(load_tiny(tiny_dir), final).eval()
    task.trainable.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, task.trainable(**inputs).logits, atol=1e-3, rtol=1e-3)
        assert not torch.allclose(merged(**inputs).logits, load_tiny(tiny_dir)(**inputs).logits, atol=1e-2)


def test_loss_is_the_answer_loss_and_pruning_is_active(tiny_dir, processor, tmp_path):
    batch, _ = batch_of(processor, tmp_path)
    unpruned = PrunedLoRATask(load_tiny(tiny_dir), NoPruner(), SETTINGS)
    with torch.no_grad():
        loss, metrics = unpruned.loss(unpruned.trainable, batch)
        stock = load_tiny(tiny_dir)(**batch).loss  # transformers' own answer loss, no session
    torch.testing.assert_close(loss, stock, atol=1e-5, rtol=1e-5)
    assert metrics["reserve_ratio"] == 1.0
    pruned = PrunedLoRATask(load_tiny(tiny_dir), PyramidDropPruner(0.25, layers=[0, 4, 8]), SETTINGS)
    with torch.no_grad():
        loss, metrics = pruned.loss(pruned.trainable, batch)
    assert torch.isfinite(loss) and abs(metrics["reserve_ratio"] - 0.25) < 0.05 and not torch.isclose(loss, stock)
