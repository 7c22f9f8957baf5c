"""`python -m covipal.train stage=1|2|lora`: train the PPM (stage 1: attention distillation; stage 2: end to end
through the frozen LLM with the soft mask, starting from a stage-1 PPM), or (stage=lora) LoRA adapters of the LLM
with a pruner active — PDrop* with the default `pruner=pdrop`. Defaults: the tiny model on the tiny world's
training split, a few minutes on CPU. The result lands in `<run dir>/final`, ready for
`python -m covipal.eval pruner=covipal classifier=<run dir>/final` (or `pruner=pdrop adapter=<run dir>/final`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from covipal.api import build_model
from covipal.cli import run_hydra_entry, user_errors
from covipal.data.conversation import TrainingCollator, turn_token_ids
from covipal.data.mixture import mixture
from covipal.errors import CovipalError
from covipal.models.adapters import trainable_parameters
from covipal.models.loading import LoadedModel
from covipal.models.ppm import PPMClassifier, PPMConfig
from covipal.training.diagnostics import RetentionDiagnostics
from covipal.training.loop import LoopConfig, train
from covipal.training.lora import LoRASettings, PrunedLoRATask
from covipal.training.run_log import RunLog
from covipal.training.stage1 import Stage1Settings, Stage1Task
from covipal.training.stage2 import Stage2Settings, Stage2Task

STAGES = (1, 2, "lora")
RANDOM_INIT = "random"


def apply_aspect_ratio(loaded: LoadedModel, value: str | None) -> None:
    """Set the anyres maximum (e.g. anyres_max_2) on this model instance's config and on its processor."""
    if value:
        loaded.model.config.vision_aspect_ratio = value
        loaded.processor.vision_aspect_ratio = value


def new_ppm(loaded: LoadedModel, seed: int, init: str | None = None) -> PPMClassifier:
    """A seeded PPM sized for the model, or the checkpoint `init` (which must read this model's width)."""
    width = loaded.model.config.text_config.hidden_size
    if init:
        try:
            return PPMClassifier.from_pretrained(Path(init), expected_input_size=width)
        except (FileNotFoundError, ValueError) as error:
            raise CovipalError(str(error)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PPMClassifier(PPMConfig(input_size=width, **(loaded.ppm or {})))


def stage_settings(node: DictConfig) -> tuple[float, str | None, dict]:
    """A stage's learning rate, init and the rest of its settings."""
    settings = OmegaConf.to_container(node, resolve=True)
    return settings.pop("lr"), settings.pop("init"), settings


def build_task(cfg: DictConfig, loaded: LoadedModel):
    """The stage's task and learning rate. Stage 2 starts from a stage-1 PPM; `stage2.init=random` (the paper's
    collapse ablation) is the only way to start it from scratch."""
    if cfg.stage == "lora":
        settings = OmegaConf.to_container(cfg.lora, resolve=True)
        lr = settings.pop("lr")
        pruner = instantiate(cfg.pruner)
        pruner.setup(loaded.model)  # bad layers or an unreachable r fail here, before any training
        return PrunedLoRATask(loaded.model, pruner, LoRASettings(**settings)), lr
    if OmegaConf.is_missing(cfg.get(f"stage{cfg.stage}", {}), "init"):
        raise CovipalError(f"stage{cfg.stage}.init is not set; pass stage{cfg.stage}.init=<stage-1 run dir>/final")
    if cfg.stage == 1:
        lr, init, settings = stage_settings(cfg.stage1)
        turn_ids = turn_token_ids(loaded.processor.tokenizer)
        return Stage1Task(
            loaded.model, new_ppm(loaded, cfg.seed, init), Stage1Settings(**settings), turn_ids=turn_ids
        ), lr
    lr, init, settings = stage_settings(cfg.stage2)
    if init is None:
        raise CovipalError(
            "stage 2 starts from a stage-1 PPM: pass stage2.init=<stage-1 run dir>/final "
            "(or stage2.init=random for the paper's random-initialisation ablation)"
        )
    ppm = new_ppm(loaded, cfg.seed, None if init == RANDOM_INIT else init)
    return Stage2Task(loaded.model, ppm, Stage2Settings(**settings)), lr


def build_data(cfg: DictConfig):
    missing = sorted(OmegaConf.missing_keys(cfg.data))
    if missing:
        raise CovipalError(f"data.{missing[0]} is not set; pass data.{missing[0]}=/path/to/your/copy")
    sources = {name: instantiate(node) for name, node in (cfg.data.sources or {}).items()}
    return mixture(sources)


def shared_output_dir(path: str) -> Path:
    """The main process's run directory, for every process (each computes its own timestamped one)."""
    holder = [path]
    if PartialState().num_processes > 1:
        broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


def run(cfg: DictConfig) -> Path:
    stage = cfg.stage
    if stage not in STAGES:
        raise CovipalError(f"stage={stage} is not available; use stage=1, stage=2 or stage=lora")
    state = PartialState()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if stage == 2:
        Stage2Settings(**stage_settings(cfg.stage2)[2])  # a bad setting stops here, before the model loads
    output_dir = shared_output_dir(cfg.output_dir)
    loaded = build_model(cfg)
    apply_aspect_ratio(loaded, cfg.data.get("vision_aspect_ratio"))
    dataset = build_data(cfg)
    # the PPM reads only the first question's prompt: stage 1's rows are that prompt, stage 2 marks it
    collate = TrainingCollator(
        loaded.processor,
        cfg.data.max_length,
        labels=stage in (2, "lora"),
        prompt_only=stage == 1,
        mark_prompt=stage == 2,
    )
    task, lr = build_task(cfg, loaded)
    loop = LoopConfig(lr=lr, **OmegaConf.to_container(cfg.train, resolve=True))
    log = RunLog(
        output_dir,
        enabled=state.is_main_process,
        wandb_mode=cfg.logger.wandb,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name or output_dir.name,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if state.is_main_process:
        if stage == "lora":
            total = sum(p.numel() for p in task.trainable.parameters())
            what = f"LoRA {trainable_parameters(task.trainable):,} trainable parameters of {total:,}"
        else:
            what = f"PPM {sum(p.numel() for p in task.trainable.parameters()):,} parameters"
        print(f"stage {stage}: {len(dataset)} samples, {what}, run dir {output_dir}")
        (output_dir / "config.json").write_text(json.dumps(OmegaConf.to_container(cfg, resolve=True), indent=1))
    diagnostics = RetentionDiagnostics(task, output_dir, log) if stage == 2 and state.is_main_process else None
    final = train(task, dataset, collate, loop, output_dir, log=log, resume=cfg.resume, on_step=diagnostics)
    if diagnostics is not None:
        diagnostics.finish()
    if state.is_main_process:
        # quoted: a sweep's job directory has "=" and "," in its name, which Hydra's override grammar would parse
        if stage == "lora":
            choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
            pruner = choices.get("pruner", "pdrop")
            print(
                f"LoRA adapter (trained with pruner={pruner}) saved to {final}\n  evaluate: python -m covipal.eval "
                f"pruner={pruner} pruner.reserve_ratio={cfg.pruner.reserve_ratio} \"adapter='{final}'\""
            )
        else:
            print(f"PPM saved to {final}\n  evaluate: python -m covipal.eval pruner=covipal \"classifier='{final}'\"")
    return final


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


def main() -> None:
    run_hydra_entry(_main)


if __name__ == "__main__":
    main()
