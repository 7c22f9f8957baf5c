"""Run a short stage-1 training on the test model (launched by tests, alone or under torchrun).

usage: stage1_run.py TINY_DIR DATA_CACHE OUTPUT_DIR [max_steps] [grad_accum] [lr]"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)

from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration  # noqa: E402

from covipal.data.conversation import TrainingCollator, turn_token_ids  # noqa: E402
from covipal.data.mixture import mixture  # noqa: E402
from covipal.models.ppm import PPMClassifier, PPMConfig  # noqa: E402
from covipal.tiny_world.training_data import tiny_world_images, tiny_world_videos  # noqa: E402
from covipal.training.loop import LoopConfig, train  # noqa: E402
from covipal.training.stage1 import Stage1Settings, Stage1Task  # noqa: E402

PPM = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


class Crash(Exception):
    pass


def main(
    tiny_dir, cache, output, max_steps=4, grad_accum=1, crash_after=None, resume=None, model=None, free=True, lr=5e-2
):
    if model is None:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(tiny_dir)
    data = mixture({"images": tiny_world_images(12, cache_dir=cache), "videos": tiny_world_videos(4, cache_dir=cache)})
    torch.manual_seed(0)
    ppm = PPMClassifier(PPMConfig(input_size=model.config.text_config.hidden_size, **PPM))
    settings = Stage1Settings(guidance_layer=3, chunk=64)
    task = Stage1Task(model, ppm, settings, free_unused=free, turn_ids=turn_token_ids(processor.tokenizer))
    config = LoopConfig(
        lr=lr, batch_size=4, grad_accum=grad_accum, max_steps=max_steps, save_every=1, progress=False, epochs=1
    )

    def on_step(step, metrics):
        if crash_after is not None and step == crash_after:
            raise Crash(step)

    collate = TrainingCollator(processor, 3000, labels=False, prompt_only=True)
    return train(task, data, collate, config, output, resume=resume, on_step=on_step)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], args[2], *(int(a) for a in args[3:5]), lr=float(args[5]) if len(args) > 5 else 5e-2)
