"""The one training loop also trains LoRA adapters of the LLM (what PDrop* needs), with no copy of the loop."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny
from peft import LoraConfig, get_peft_model

from covipal.data.conversation import TrainingCollator
from covipal.data.mixture import mixture, tiny_world_images
from covipal.training.loop import LoopConfig, train


class LoRATask:
    def __init__(self, model):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        self.trainable = get_peft_model(model, config)

    def to(self, device) -> None:
        self.trainable.to(device)

    def loss(self, trainable, batch):
        out = trainable(**batch)
        return out.loss, {}

    def save(self, trainable, directory) -> None:
        trainable.save_pretrained(directory)


# peft 0.21 still calls transformers' deprecated `is_gradient_checkpointing` when wrapping a model.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_loop_trains_only_lora_adapters(tiny_dir, processor, tmp_path):
    model = load_tiny(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = LoRATask(model)
    data = mixture({"images": tiny_world_images(8, cache_dir=str(tmp_path / "cache"))})
    config = LoopConfig(lr=1e-2, batch_size=4, max_steps=2, progress=False)
    final = train(task, data, TrainingCollator(processor), config, tmp_path / "run")
    state = task.trainable.state_dict()
    changed = {
        k
        for k, v in state.items()
        if k.replace("base_model.model.", "").replace(".base_layer", "") in before
        and not torch.equal(v, before[k.replace("base_model.model.", "").replace(".base_layer", "")])
    }
    assert not changed  # base weights untouched
    lora = [k for k in state if "lora_B" in k]
    assert lora and any(state[k].abs().sum() > 0 for k in lora)  # lora_B starts at zero; it moved
    assert (final / "adapter_model.safetensors").is_file()
